"""A CPU stand-in for the slice of cuda.bindings (driver + runtime) that ddengine uses, to test the GPU loop's
orchestration without a GPU: device memory is host memory behind fake addresses, stream capture records
work instead of running it, graph launches replay the records, and the five step.cu kernels run as the C
kernels (ddengine._kernels). Kernel arguments are decoded with the types parsed from kernels/step.cu's
own signatures, so a launch that passes the wrong number, order or width of arguments is caught.
"""
import ctypes
import enum
import re
import types

import numpy as np

from ddengine import _kernels
from ddengine.cuda_step import kernel_dir

_CTYPES = {"float*": ctypes.c_void_p, "int*": ctypes.c_void_p, "longlong*": ctypes.c_void_p,
           "unsignedlonglong*": ctypes.c_void_p, "int": ctypes.c_int, "longlong": ctypes.c_longlong,
           "float": ctypes.c_float}


def kernel_signatures():
    """{kernel name: [(ctypes type, parameter name)]} parsed from the extern "C" entry points of step.cu."""
    source = (kernel_dir() / "step.cu").read_text()
    signatures = {}
    for name, params in re.findall(r'extern "C" __global__ void (\w+)\(([^)]*)\)', source):
        decoded = []
        for param in params.split(","):
            *words, pname = param.replace("*", " * ").split()
            ctype = "".join(w for w in words if w != "const")
            decoded.append((_CTYPES[ctype], pname))
        signatures[name] = decoded
    return signatures


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1


class cudaError_t(enum.IntEnum):  # noqa: N801 (the binding's name)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureUnsupported = 900


class Emulator:
    """The fake device: memory, streams (each either running or capturing) and graphs."""

    def __init__(self):
        self.memory = {}  # base address -> bytearray
        self.next_address = 0x7F0000000000
        self.capturing = {}  # stream handle -> list of recorded callables
        self.graphs = {}
        self.launches = []  # kernel names, in execution order (replays included)
        self.signatures = kernel_signatures()
        self.driver, self.runtime = self._driver(), self._runtime()
        self.nvrtc = types.SimpleNamespace(nvrtcGetSupportedArchs=lambda: (CUresult.CUDA_SUCCESS, [80, 90]))

    # memory -------------------------------------------------------------------------------------------
    def alloc(self, nbytes):
        address = self.next_address
        self.memory[address] = bytearray(nbytes)
        self.next_address += (nbytes + 511) // 256 * 256
        return address

    def view(self, address, dtype, count):
        """A writable numpy view of `count` elements at a device address."""
        for base, buffer in self.memory.items():
            if base <= address < base + len(buffer):
                offset = address - base
                nbytes = count * np.dtype(dtype).itemsize
                if offset + nbytes > len(buffer):
                    raise IndexError(f"access of {nbytes} bytes at +{offset} overruns a {len(buffer)}-byte allocation")
                return np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
        raise IndexError(f"address {address:#x} is not device memory")

    def submit(self, stream, work):
        """Run `work` now, or record it when `stream` is being captured."""
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(work)
        else:
            work()

    # kernels ------------------------------------------------------------------------------------------
    def launch(self, name, params_address):
        signature = self.signatures[name]
        pointers = (ctypes.c_void_p * len(signature)).from_address(params_address)
        args = {pname: ctype.from_address(pointers[i]).value or 0 for i, (ctype, pname) in enumerate(signature)}
        body = getattr(self, "_" + name)
        return lambda: (self.launches.append(name), body(**args))

    def _ddstep_step(self, x, model_out, coeff_table, step_index, seeds, batch, per_image, use_guidance, guidance, clip):
        n = int(self.view(step_index, np.int32, 1)[0])
        xs = self.view(x, np.float32, batch * per_image).reshape(batch, per_image)
        m = self.view(model_out, np.float32, (2 if use_guidance else 1) * batch * per_image).reshape(-1, per_image)
        row = self.view(coeff_table, np.float32, 9 * (n + 1))[9 * n:]
        _kernels.step(xs, m, row, self.view(seeds, np.uint64, batch), n, guidance=guidance if use_guidance else None,
                      clip=clip if clip > 0 else None)

    def _ddstep_fill_noise(self, out, seeds, batch, per_image):
        _kernels.fill_noise(self.view(out, np.float32, batch * per_image).reshape(batch, per_image), self.view(seeds, np.uint64, batch))

    def _set_timesteps(self, t_out, t_table, step_index, n, dtype):
        i = int(self.view(step_index, np.int32, 1)[0])
        self.view(t_out, dtype, n)[:] = self.view(t_table, np.int64, i + 1)[i]

    def _ddstep_set_timesteps_i64(self, t_out, t_table, step_index, n):
        self._set_timesteps(t_out, t_table, step_index, n, np.int64)

    def _ddstep_set_timesteps_f32(self, t_out, t_table, step_index, n):
        self._set_timesteps(t_out, t_table, step_index, n, np.float32)

    def _ddstep_advance(self, step_index):
        self.view(step_index, np.int32, 1)[0] += 1

    # bindings -----------------------------------------------------------------------------------------
    def _driver(self):
        ok = CUresult.CUDA_SUCCESS
        d = types.SimpleNamespace(CUresult=CUresult, CUstream=lambda h: int(h))
        d.cuGetErrorString = lambda status: (ok, b"emulated error")
        d.cuDriverGetVersion = lambda: (ok, 13000)
        d.cuModuleLoadData = lambda image: (ok, "module")
        d.cuModuleGetFunction = lambda module, name: (ok, name.decode())

        def cu_launch_kernel(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            assert gx * bx >= 1 and (gy, gz, by, bz, shared, extra) == (1, 1, 1, 1, 0, 0)
            self.submit(stream, self.launch(function, params))
            return (ok,)

        d.cuLaunchKernel = cu_launch_kernel
        return d

    def _runtime(self):
        ok = cudaError_t.cudaSuccess
        r = types.SimpleNamespace(cudaError_t=cudaError_t, cudaStreamNonBlocking=1)
        r.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3)
        r.cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1)
        r.cudaGetErrorString = lambda status: (ok, b"emulated error")
        r.cudaGetDeviceCount = lambda: (ok, 1)
        r.cudaSetDevice = lambda device: (ok,)
        r.cudaFree = lambda address: (ok,) if address == 0 or self.memory.pop(int(address), None) is not None else (cudaError_t.cudaErrorInvalidValue,)
        r.cudaGetDeviceProperties = lambda device: (ok, types.SimpleNamespace(name=b"Emulated GPU\0\0", major=9, minor=0))
        r.cudaMalloc = lambda nbytes: (ok, self.alloc(nbytes))
        streams = iter(range(0x5000, 0x6000))
        r.cudaStreamCreateWithFlags = lambda flags: (ok, next(streams))
        r.cudaStreamDestroy = lambda stream: (ok,)
        r.cudaStreamSynchronize = lambda stream: (ok,) if int(stream) not in self.capturing else (cudaError_t.cudaErrorStreamCaptureUnsupported,)

        def memcpy(dst, src, nbytes, kind, stream):
            if kind != 3 and int(stream) in self.capturing:
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)  # host copies cannot be captured
            def copy():
                if kind == 1:
                    self.view(dst, np.uint8, nbytes)[:] = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(src))
                elif kind == 2:
                    np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(dst))[:] = self.view(src, np.uint8, nbytes)
                else:
                    self.view(dst, np.uint8, nbytes)[:] = self.view(src, np.uint8, nbytes).copy()
            self.submit(stream, copy)
            return (ok,)

        r.cudaMemcpyAsync = memcpy

        def begin(stream, mode):
            self.capturing[int(stream)] = []
            return (ok,)

        def end(stream):
            graph = object()
            self.graphs[id(graph)] = self.capturing.pop(int(stream))
            return (ok, id(graph))

        r.cudaStreamBeginCapture, r.cudaStreamEndCapture = begin, end
        r.cudaGraphInstantiate = lambda graph, flags: (ok, ("exec", list(self.graphs[graph])))
        r.cudaGraphDestroy = lambda graph: (ok,) if self.graphs.pop(graph, None) is not None else (cudaError_t.cudaErrorInvalidValue,)
        r.cudaGraphExecDestroy = lambda graph_exec: (ok,)

        def graph_launch(graph_exec, stream):
            for work in graph_exec[1]:
                self.submit(stream, work)
            return (ok,)

        r.cudaGraphLaunch = graph_launch
        return r
