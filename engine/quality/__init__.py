"""Layer `quality`: how good the samples are — FID and classifier accuracy against Fashion-MNIST test images.

May import `runtime` and every layer below it; not `serving`, `benchmark`, `export` or `cli`."""
