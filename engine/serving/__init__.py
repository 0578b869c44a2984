"""Layer `serving`: concurrent requests — the step batcher (exact step-level batching), the FastAPI app, the Ray Serve
deployment.

May import `runtime` and every layer below it; not `quality`, `benchmark`, `export` or `cli`."""
