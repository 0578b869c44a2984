"""Layer `gpu`: CUDA plumbing — cuda-python calls and their errors, streams and device memory, NVRTC compilation
with a per-architecture cache. Nothing here knows about sampling.

cuda-python is imported lazily: importing these modules costs nothing on a machine without a GPU.
May import `files`."""
