"""The GPU side of the runtime: cuda-python helpers, device memory, the NVRTC-compiled step kernels, the device loop.

cuda-python is imported lazily: importing these modules costs nothing on a machine without a GPU.
"""
