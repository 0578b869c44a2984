"""HTTP serving: `create_app(sampler_or_loader, Settings())` -> a FastAPI app around one StepBatcher.

    POST /v1/images/generations, /v1/images/edits  OpenAI's images API (engine/serving/openai_api.py; the `openai`
      SDK works unchanged).
    POST /v1/images  a SamplingParams (engine/runtime/params.py): {"n", "steps", "method", "eta", "seed" | "seeds",
                      "classes", "guidance", "spacing", "prompt", "negative_prompt", "image", "mask", "strength"}
      ?stream=true[&previews=K]: Server-Sent Events instead, progress per step, K previews, then the result.
      200 {"model", "backend", "precision", parameters..., "images": [{"index", "seed", "class", "status", "error",
          "png"}]} (a non-finite image has status "error" and png null), 400 a body that ended early (the client
      left, or its chunked framing was malformed: uvicorn answers that 400 itself), 413 body too large, 422 invalid
      parameters, 503 queue full (Retry-After) / loading / draining, 504 past the request timeout, 500 the backend
      failed.
      Every error body is {"error": "<one message>"}.
    GET /healthz (200 once loaded, with the worker's liveness, watchdog restarts and the last failed request;
      503 while loading or draining, or if the worker stopped), GET /metrics (Prometheus text),
    GET /openapi.json (the schema, the request body's derived from SamplingParams).

No global state: each app owns its Sampler, batcher and metrics registry (so a Ray replica owns one of each).
"""

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ddengine.runtime.output import encode_png
from ddengine.runtime.params import InvalidParameterError, SamplingParams, integer
from ddengine.serving.batcher import BatcherClosed, QueueFull, StepBatcher
from ddengine.serving.openai_api import (
    ImageEditRequest,
    ImageGenerationRequest,
    OpenAIError,
    parse_edit,
    parse_generation,
    sampling_params,
    sse,
    stream_event,
)
from ddengine.serving.openai_api import response_body as openai_response

DISCONNECT_POLL_S = 0.2  # how often a waiting request checks whether its client is gone
CLIENT_GONE = 499  # nginx's code for "client closed the request": recorded in metrics, never sent
# A body that stops before its end: the client left mid-upload, or uvicorn refused its framing (a bad chunk size, say)
# with its own 400 and closed the connection. The app sees both as a disconnect, so both are 400s (the metrics'
# code="400"; a server that can still answer sends this message), never a 500 and a traceback.
INCOMPLETE_BODY = (
    "the request body ended before it was complete (the client disconnected, or its framing was malformed)"
)


@dataclass(frozen=True)
class Settings:
    """What a server instance is configured with (the CLI's and the Ray deployment's options)."""

    max_batch: int = 16
    max_queue: int = 1024  # images waiting for a batch slot; also the largest n one request may ask for
    timeout: float | None = None  # seconds from acceptance to the last image (504 past it)
    max_body_bytes: int = 64 * 1024
    step_timeout: float | None = 300.0  # seconds one batched step may take before the watchdog restarts the core


class HTTPError(Exception):
    """An error response: {"error": message} with a status code (and headers, e.g. Retry-After)."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class AppState:
    """The per-app state: loading status, the Sampler, its StepBatcher and the metrics."""

    def __init__(self, settings, batcher_class=StepBatcher):
        self.settings, self.status, self.error = settings, "loading", None
        self.batcher_class = batcher_class
        self.sampler = self.batcher = None
        self.batch_invariant = None
        self.owns_sampler = False
        self.metrics = Metrics(self)

    def start(self, sampler):
        """Serve with `sampler` (blocking: probes batch invariance, starts the batcher's worker)."""
        from ddengine.backends.base import probe_batch_invariance

        self.sampler = sampler
        self.batch_invariant = bool(probe_batch_invariance(sampler.backend, sampler.spec))
        self.batcher = self.batcher_class(
            sampler.parts,
            self.settings.max_batch,
            self.settings.max_queue,
            on_step=self.metrics.observe_step,
            step_timeout=self.settings.step_timeout,
        )
        self.status = "ok"

    def load(self, load):
        """Open the Sampler with `load()` (a thread's work), then start; a failure is kept for /healthz."""
        try:
            self.owns_sampler = True
            self.start(load())
        except Exception as err:
            self.status, self.error = "failed", f"the model could not be loaded: {err}"
            raise

    def begin_drain(self):
        """Refuse new requests (503) and report draining; what was accepted still runs."""
        if self.status == "ok":
            self.status = "draining"

    def stop(self, drain=True):
        """Close the batcher (drain: finish the accepted work; else fail it with an error)."""
        self.begin_drain()
        if self.batcher is not None:
            self.batcher.close(drain=drain)
        if self.owns_sampler and self.sampler is not None and drain:
            self.sampler.close()
            self.owns_sampler = False


class Metrics:
    """The app's Prometheus metrics, in its own CollectorRegistry (several apps in one process never clash)."""

    STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
    REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

    def __init__(self, state):
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram

        self.content_type = CONTENT_TYPE_LATEST
        self.registry = registry = CollectorRegistry()

        def gauge(name, doc, read):
            Gauge(name, doc, registry=registry).set_function(
                lambda: 0.0 if state.batcher is None else read(state.batcher)
            )

        gauge("ddengine_queued_images", "Images waiting for a batch slot.", lambda s: s.queued_images)
        gauge("ddengine_active_images", "Images in the running batch.", lambda s: s.active_images)
        gauge("ddengine_batch_occupancy", "Forward rows in use / rows the batch holds.", lambda s: s.occupancy())
        Gauge("ddengine_ready", "1 while the server takes requests.", registry=registry).set_function(
            lambda: float(state.status == "ok")
        )
        self.step = Histogram(
            "ddengine_step_seconds",
            "Wall time of one batched denoising step.",
            buckets=self.STEP_BUCKETS,
            registry=registry,
        )
        self.request = Histogram(
            "ddengine_request_seconds",
            "POST /v1/images latency by status code.",
            ["code"],
            buckets=self.REQUEST_BUCKETS,
            registry=registry,
        )
        registry.register(BatcherCounters(state))

    def observe_step(self, rows, seconds):
        self.step.observe(seconds)

    def observe_request(self, status, seconds):
        self.request.labels(str(status)).observe(seconds)

    def render(self):
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class BatcherCounters:
    """The batcher's own counters (requests by outcome, images, steps) as Prometheus counters."""

    OUTCOMES = ("submitted", "rejected", "completed", "failed", "cancelled", "timed_out")

    def __init__(self, state):
        self.state = state

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        stats = {} if self.state.batcher is None else dict(self.state.batcher.stats)
        requests = CounterMetricFamily(
            "ddengine_requests", "Requests by outcome at the batcher (rejected: queue full).", labels=["outcome"]
        )
        for outcome in self.OUTCOMES:
            requests.add_metric([outcome], stats.get(outcome, 0))
        yield requests
        yield CounterMetricFamily(
            "ddengine_images_completed", "Images finished; rate() gives images/s.", value=stats.get("images", 0)
        )
        yield CounterMetricFamily("ddengine_steps", "Batched denoising steps run.", value=stats.get("steps", 0))


def create_app(sampler_or_loader, settings=None, *, background_load=False, batcher_class=StepBatcher):
    """A FastAPI app serving a Sampler, or a zero-argument callable opening one at startup (in a thread).

    background_load: start answering at once (/healthz 503 until the model is loaded) instead of after loading.
    batcher_class: StepBatcher, or a callable making one with its interface, e.g. functools.partial(StepBatcher,
    policy=RequestLevel()) (engine/serving/policies.py; bench/bench_serve.py's modes).
    """
    settings = settings or Settings()
    state = AppState(settings, batcher_class)

    @asynccontextmanager
    async def lifespan(app):
        loading = None
        if not hasattr(sampler_or_loader, "backend"):  # a loader, not a Sampler
            loading = asyncio.ensure_future(asyncio.to_thread(state.load, sampler_or_loader))
            if not background_load:
                await loading
        else:
            await asyncio.to_thread(state.start, sampler_or_loader)
        try:
            yield
        finally:
            if loading is not None and not loading.done():
                await asyncio.gather(loading, return_exceptions=True)
            await asyncio.to_thread(state.stop, True)

    app = FastAPI(title="ddengine", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.app_state = state
    add_error_handlers(app)
    add_routes(app, state)
    return app


def add_error_handlers(app):
    """Every error as {"error": message}: ours, FastAPI's validation and Starlette's 404/405; OpenAI's routes in
    OpenAI's shape."""

    @app.exception_handler(HTTPError)
    async def http_error(request, err):
        return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)

    @app.exception_handler(OpenAIError)
    async def openai_error(request, err):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def starlette_error(request, err):
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err):
        return JSONResponse(
            {"error": "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())}, status_code=422
        )


def add_routes(app, state):
    @app.post("/v1/images", openapi_extra=request_body_schema())
    async def images(request: Request):
        return await observed(state, generate(state, request))

    @app.post("/v1/images/generations", openapi_extra=request_body_schema(ImageGenerationRequest))
    async def images_generations(request: Request):
        """OpenAI's images API (engine/serving/openai_api.py): what the `openai` SDK's images.generate sends."""
        return await observed(state, generate_openai(state, request))

    @app.post("/v1/images/edits", openapi_extra=edit_body_schema())
    async def images_edits(request: Request):
        """OpenAI's image edits (engine/serving/openai_api.py): image-to-image, and inpainting with a mask."""
        return await observed(state, generate_openai(state, request, edit=True))

    @app.get("/healthz")
    async def healthz():
        if state.status == "ok" and not state.batcher.worker_alive:
            state.status, state.error = "failed", "the batcher's worker thread stopped"
        if state.status != "ok":
            body = {"status": state.status} | ({"error": state.error} if state.error else {})
            return JSONResponse(body, status_code=503)
        s, b = state.sampler, state.batcher
        return {
            "status": "ok",
            "worker_alive": True,
            "restarts": b.restarts,
            "last_failure": b.last_failure,
            "model": s.model.sha256,
            "backend": s.backend.name,
            "precision": s.backend.precision,
            "batch_invariant": state.batch_invariant,
            "max_batch": state.settings.max_batch,
            "max_queue": state.settings.max_queue,
        }

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)


async def observed(state, work):
    """Await a POST's response; its status code and latency go to the request metrics (errors included)."""
    start, status = time.perf_counter(), 500
    try:
        response = await work
        status = response.status_code
        return response
    except (HTTPError, OpenAIError) as err:
        status = err.status
        raise
    finally:
        state.metrics.observe_request(status, time.perf_counter() - start)


async def generate(state, request):
    """POST /v1/images: parse, validate, queue, wait (cancelling if the client leaves), encode; with ?stream=true,
    Server-Sent Events instead: progress after every step, ?previews=K previews, then the result."""
    stream, previews = stream_query(request)
    body = parse_body(await read_body(request, state.settings.max_body_bytes))
    if state.status != "ok":
        raise not_serving(state)
    sampling = await asyncio.to_thread(validate, state, body)  # a latent model's VAE encoder runs here
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def send(event, data):  # from the worker thread
        loop.call_soon_threadsafe(events.put_nowait, (event, data))

    try:
        future = state.batcher.submit(
            sampling,
            timeout=state.settings.timeout,
            previews=previews,
            on_preview=lambda k, images: send("preview", (k, images)),
            on_progress=(lambda done, total: send("progress", {"done": done, "total": total})) if stream else None,
        )
    except QueueFull as err:
        raise HTTPError(503, str(err), {"Retry-After": str(err.retry_after)}) from None
    except BatcherClosed as err:
        raise HTTPError(503, str(err)) from None
    if stream:
        return StreamingResponse(native_events(future, events), media_type="text/event-stream")
    result = await wait_for(future, request)
    if result is None:
        return Response(status_code=CLIENT_GONE)
    return JSONResponse(await asyncio.to_thread(response_body, result))


def stream_query(request):
    """(stream, previews) of POST /v1/images' query string; previews (0-10) need stream."""
    stream = request.query_params.get("stream", "false").lower()
    if stream not in ("true", "false", "1", "0"):
        raise HTTPError(422, f"stream must be true or false, got {stream!r}")
    raw = request.query_params.get("previews", "0")
    if not raw.isdigit() or int(raw) > 10:
        raise HTTPError(422, f"previews must be an integer in [0, 10], got {raw!r}")
    if int(raw) and stream in ("false", "0"):
        raise HTTPError(422, "previews need stream=true")
    return stream in ("true", "1"), int(raw)


async def queued_until_done(waiter, queue):
    """Yield what the worker puts on `queue` until the request's `waiter` (an asyncio future) is done."""
    while True:
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            return
        yield getter.result()


async def native_events(future, events):
    """POST /v1/images?stream=true: `progress` ({done, total}) events, `preview` ({k, images: [png]}) events, then
    `result` (the non-streamed body) or `error` ({error}); leaving early cancels the images."""
    waiter = asyncio.wrap_future(future)
    try:
        async for event, data in queued_until_done(waiter, events):
            if event == "preview":
                k, images = data
                data = {"k": k, "images": await asyncio.to_thread(lambda images=images: [b64_png(i) for i in images])}
            yield sse(event, data)
        try:
            yield sse("result", await asyncio.to_thread(response_body, outcome(waiter)))
        except HTTPError as err:
            yield sse("error", {"error": err.message, "status": err.status})
    finally:
        future.cancel()


async def generate_openai(state, request, edit=False):
    """POST /v1/images/generations (or /edits: a multipart form): as generate, with OpenAI's body, errors and
    response."""
    try:
        raw = await read_body(request, state.settings.max_body_bytes)
        body, images, mask = await parse_edit(raw, request.headers) if edit else (parse_generation(raw), None, None)
        if state.status != "ok":
            raise not_serving(state)
        params = sampling_params(body, state.sampler.spec, state.sampler.image_shape, images, mask)
        sampling = await asyncio.to_thread(validate, state, params)  # off the event loop: a VAE encoder may run
    except HTTPError as err:
        raise OpenAIError(400 if err.status == 422 else err.status, err.message, headers=err.headers) from None
    loop, previews = asyncio.get_running_loop(), asyncio.Queue()
    try:
        future = state.batcher.submit(
            sampling,
            timeout=state.settings.timeout,
            previews=body.partial_images or 0 if body.stream else 0,
            on_preview=lambda k, images: loop.call_soon_threadsafe(previews.put_nowait, (k, images)),
        )
    except QueueFull as err:
        raise OpenAIError(429, str(err), code="queue_full", headers={"Retry-After": str(err.retry_after)}) from None
    except BatcherClosed as err:
        raise OpenAIError(503, str(err)) from None
    if body.stream:
        events = openai_events(future, previews, body)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        result = await wait_for(future, request)
    except HTTPError as err:
        raise OpenAIError(err.status, err.message, retry=False) from None
    if result is None:
        return Response(status_code=CLIENT_GONE)
    failed = failure(result)
    if failed:
        raise OpenAIError(500, failed, retry=False)
    return JSONResponse(await asyncio.to_thread(openai_response, result.images, body))


async def openai_events(future, previews, body):
    """The SSE stream of one request: its partial images as the worker sends them, then each final image (or an
    error event); leaving early (the client went away) cancels its images."""
    waiter = asyncio.wrap_future(future)
    try:
        async for k, images in queued_until_done(waiter, previews):
            for image in images:
                yield await asyncio.to_thread(stream_event, "partial_image", image, body, k)
        try:
            result = outcome(waiter)
        except HTTPError as err:
            yield sse("error", OpenAIError(err.status, err.message).body())
            return
        failed = failure(result)
        if failed:
            yield sse("error", OpenAIError(500, failed).body())
            return
        for image in result.images:
            yield await asyncio.to_thread(stream_event, "completed", image, body)
    finally:
        future.cancel()


def failure(result):
    """The message of a finished request's first failed image, or None (OpenAI's API has no per-image status)."""
    failed = [r for r in result.records if r["status"] != "ok"]
    return f"image {failed[0]['index']} failed: {failed[0]['error']}" if failed else None


def not_serving(state):
    if state.status == "loading":
        return HTTPError(503, "the model is still loading", {"Retry-After": "1"})
    if state.status == "failed":
        return HTTPError(503, state.error)
    return HTTPError(503, "the server is shutting down and takes no new requests")


async def read_body(request, limit):
    """The request body, refused with 413 past `limit` bytes (by Content-Length, then as it streams in) and with 400
    if it ends early (INCOMPLETE_BODY); every POST reads its body here."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the body is {int(declared)} bytes; this server takes at most {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"the body is over {limit} bytes, the most this server takes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(400, INCOMPLETE_BODY) from None
    return b"".join(chunks)


def request_body_schema(model=SamplingParams):
    """The OpenAPI requestBody of a POST: the pydantic model's JSON schema (the body is read by read_body, which
    bounds its size before parsing, so FastAPI does not parse it itself)."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def edit_body_schema():
    """The OpenAPI requestBody of POST /v1/images/edits: a multipart form of files and ImageEditRequest's fields."""
    fields = ImageEditRequest.model_json_schema()
    files = {"type": "string", "format": "binary"}
    fields["properties"] |= {"image": files, "mask": files}
    fields["required"] = [*fields.get("required", []), "image"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": fields}}}}


def parse_body(raw):
    """SamplingParams from JSON bytes; malformed JSON and wrong or unknown fields -> 422 with one message."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise HTTPError(422, f"the body must be a JSON object: {err}") from None
    if not isinstance(data, dict):
        raise HTTPError(422, f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return SamplingParams.parse(data)
    except InvalidParameterError as err:
        raise HTTPError(422, str(err)) from None


def validate(state, params):
    """The validated Request (Sampler.request); n is also bounded by the queue (a larger one could never run)."""
    try:
        integer("n", params.n, 1, state.settings.max_queue)
        return state.sampler.request(params, batch_size=min(params.n, state.settings.max_batch))
    except InvalidParameterError as err:
        raise HTTPError(422, str(err)) from None


async def wait_for(future, request):
    """The future's Result, or None if the client disconnected (then its images are cancelled)."""
    waiter = asyncio.wrap_future(future)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                return outcome(waiter)
            if await request.is_disconnected():
                return None
    finally:
        future.cancel()  # a no-op once it is done; frees the images' slots if the handler is cancelled or left


def outcome(waiter):
    """A finished future's Result, or the HTTPError its failure maps to."""
    try:
        return waiter.result()
    except TimeoutError as err:
        raise HTTPError(504, str(err)) from None
    except BatcherClosed as err:
        raise HTTPError(503, str(err)) from None
    except Exception as err:
        raise HTTPError(500, f"sampling failed: {err}") from None


def b64_png(image):
    """The base64 text of an image's PNG."""
    return base64.b64encode(encode_png(image)).decode("ascii")


def response_body(result):
    """The JSON of a finished request: the records' shared fields once, then each image with its PNG."""
    first = result.records[0]
    shared = {
        k: first[k]
        for k in ("steps", "method", "eta", "guidance", "spacing", "backend", "precision", "ddengine_version")
    }
    images = [
        {
            "index": r["index"],
            "seed": r["seed"],
            "class": r["class"],
            "status": r["status"],
            "error": r["error"],
            **{k: r[k] for k in ("prompt", "negative_prompt") if k in r},
            "png": b64_png(image) if r["status"] == "ok" else None,
        }
        for image, r in zip(result.images, result.records)
    ]
    return {"model": first["model_sha256"], **shared, "n": len(images), "images": images}
