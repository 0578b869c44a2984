"""Streams and device buffers on cuda.bindings' runtime API."""

import numpy as np

from ddengine.gpu import driver
from ddengine.gpu.driver import check


class Stream:
    """A non-blocking CUDA stream (the backend's; the step kernels launch on it)."""

    def __init__(self):
        _, runtime, _ = driver.import_cuda()
        self.handle = check(runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking))

    def synchronize(self):
        _, runtime, _ = driver.import_cuda()
        check(runtime.cudaStreamSynchronize(self.handle))

    def close(self):
        if self.handle is not None:
            _, runtime, _ = driver.import_cuda()
            check(runtime.cudaStreamDestroy(self.handle))
            self.handle = None

    def __int__(self):
        return int(self.handle)


class DeviceArray:
    """A C-contiguous device buffer with a numpy shape and dtype; `ptr` is its device address."""

    def __init__(self, shape, dtype):
        _, runtime, _ = driver.import_cuda()
        self.shape = tuple(int(d) for d in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self._mem = check(runtime.cudaMalloc(max(self.nbytes, 1)))
        self.ptr = int(self._mem)

    @classmethod
    def from_host(cls, array, stream=None):
        array = np.ascontiguousarray(array)
        out = cls(array.shape, array.dtype)
        out.upload(array, stream)
        return out

    def upload(self, array, stream=None):
        """Copy a host array of this dtype in (ordered on `stream`, complete on return)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.nbytes > self.nbytes:
            raise ValueError(f"host array of {array.nbytes} bytes does not fit a device buffer of {self.nbytes} bytes")
        copy(self.ptr, array.ctypes.data, array.nbytes, "cudaMemcpyHostToDevice", stream, wait=True)

    def download(self, stream=None, shape=None):
        """A host copy of the first prod(shape) elements (default: all), after the work queued on `stream`."""
        out = np.empty(self.shape if shape is None else shape, dtype=self.dtype)
        copy(out.ctypes.data, self.ptr, out.nbytes, "cudaMemcpyDeviceToHost", stream, wait=True)
        return out

    def __int__(self):
        return self.ptr

    def free(self):
        if self._mem is not None:
            _, runtime, _ = driver.import_cuda()
            check(runtime.cudaFree(self._mem))
            self._mem, self.ptr = None, 0


def copy(dst, src, nbytes, kind, stream=None, wait=False):
    """cudaMemcpyAsync on `stream` (capturable into a CUDA graph unless `wait`, which synchronizes the stream)."""
    _, runtime, _ = driver.import_cuda()
    handle = 0 if stream is None else int(stream)
    check(runtime.cudaMemcpyAsync(dst, src, nbytes, getattr(runtime.cudaMemcpyKind, kind), handle))
    if wait:
        check(runtime.cudaStreamSynchronize(handle))


def copy_device(dst_ptr, src_ptr, nbytes, stream):
    """Queue a device-to-device copy on `stream` (capturable into a CUDA graph)."""
    copy(dst_ptr, src_ptr, nbytes, "cudaMemcpyDeviceToDevice", stream)
