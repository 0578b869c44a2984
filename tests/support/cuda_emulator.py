"""A CPU stand-in for the slice of cuda.bindings (driver + runtime) that ddengine uses, to test the device loop's
orchestration without a GPU: "device" memory is host memory (bounds-checked on every kernel access), stream
capture records work instead of running it, graph launches replay the records, and every kernel launch runs
step.cu itself, compiled as host C++ (tests/support/host_cuda.py), with its arguments copied at launch time
as CUDA copies kernel parameters into a graph.
"""

import ctypes
import enum
import types

import numpy as np

from ddengine.kernels.host import IMAGE_DTYPE, StepArgs

# Bytes of each argument of each entry point (step.cu): the one params struct, or pointers and ints.
PARAM_SIZES = {
    "ddstep_step": [ctypes.sizeof(StepArgs)],
    "ddstep_fill_noise": [ctypes.sizeof(StepArgs)],
    "ddstep_set_timesteps_i64": [8, 8, 8, 4],
    "ddstep_set_timesteps_f32": [8, 8, 8, 4],
    "ddstep_advance": [8, 4],
}


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1


class cudaError_t(enum.IntEnum):  # noqa: N801 (the binding's name)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureUnsupported = 900


class Emulator:
    """The fake device: memory, streams (each either running or capturing) and graphs."""

    def __init__(self, host_cuda):
        self.host_cuda = host_cuda  # step.cu compiled for the host (build_host_cuda)
        self.memory = {}  # address -> numpy uint8 buffer
        self.capturing = {}  # stream handle -> list of recorded callables
        self.graphs = {}
        self.launches = []  # kernel names, in execution order (replays included)
        self.driver, self.runtime = self._driver(), self._runtime()
        self.nvrtc = types.SimpleNamespace(nvrtcGetSupportedArchs=lambda: (CUresult.CUDA_SUCCESS, [80, 90]))

    # memory -------------------------------------------------------------------------------------------
    def alloc(self, nbytes):
        buffer = np.zeros(max(nbytes, 1), dtype=np.uint8)
        self.memory[buffer.ctypes.data] = buffer
        return buffer.ctypes.data

    def check_range(self, address, nbytes, what):
        """Raise IndexError unless [address, address + nbytes) lies in one allocation."""
        for base, buffer in self.memory.items():
            if base <= address < base + len(buffer):
                if address - base + nbytes > len(buffer):
                    raise IndexError(
                        f"{what}: {nbytes} bytes at +{address - base} overrun a {len(buffer)}-byte allocation"
                    )
                return
        raise IndexError(f"{what}: address {address:#x} is not device memory")

    def view(self, address, dtype, count):
        """A writable numpy view of `count` elements at a device address."""
        dtype = np.dtype(dtype)
        self.check_range(address, count * dtype.itemsize, "view")
        return np.ctypeslib.as_array((ctypes.c_uint8 * (count * dtype.itemsize)).from_address(address)).view(dtype)

    def submit(self, stream, work):
        """Run `work` now, or record it when `stream` is being captured."""
        if int(stream) in self.capturing:
            self.capturing[int(stream)].append(work)
        else:
            work()

    # kernels ------------------------------------------------------------------------------------------
    def launch(self, name, params_address, grid):
        """Copy the launch's arguments now (as a captured graph does) and return the work that runs the kernel."""
        pointers = (ctypes.c_void_p * len(PARAM_SIZES[name])).from_address(params_address)
        copies = [
            ctypes.create_string_buffer(ctypes.string_at(p, size), size) for p, size in zip(pointers, PARAM_SIZES[name])
        ]

        def run():
            self._check_args(name, copies)
            params = (ctypes.c_void_p * len(copies))(*[ctypes.addressof(c) for c in copies])
            getattr(self.host_cuda, f"launch_{name}")(grid, 256, ctypes.addressof(params))
            self.launches.append(name)

        return run

    def _check_args(self, name, copies):
        """Every buffer a kernel will touch lies inside device memory (the real GPU would fault)."""
        if name in ("ddstep_step", "ddstep_fill_noise"):
            a = StepArgs.from_buffer_copy(copies[0].raw)
            per = a.per_image * 4
            self.check_range(a.x, a.batch * per, f"{name} x")
            self.check_range(a.images, a.batch * IMAGE_DTYPE.itemsize, f"{name} images")
            if name == "ddstep_step":
                images = self.view(a.images, IMAGE_DTYPE, a.batch)
                self.check_range(a.table, (int(images["row"].max()) + 1) * 36, "ddstep_step table")
                rows = max(a.batch, int(images["uncond"].max()) + 1)
                self.check_range(a.model_out, rows * per, "ddstep_step model_out")
        else:
            batch = ctypes.c_int.from_buffer_copy(copies[-1].raw).value
            images = ctypes.c_void_p.from_buffer_copy(copies[-2].raw).value
            self.check_range(images, batch * IMAGE_DTYPE.itemsize, f"{name} images")

    # bindings -----------------------------------------------------------------------------------------
    def _driver(self):
        ok = CUresult.CUDA_SUCCESS
        d = types.SimpleNamespace(CUresult=CUresult, CUstream=lambda h: int(h))
        d.cuGetErrorString = lambda status: (ok, b"emulated error")
        d.cuDriverGetVersion = lambda: (ok, 13000)
        d.cuModuleLoadData = lambda image: (ok, "module")
        d.cuModuleGetFunction = lambda module, name: (ok, name.decode())

        def cu_launch_kernel(function, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            assert gx * bx >= 1 and (gy, gz, bx, by, bz, shared, extra) == (1, 1, 256, 1, 1, 0, 0)
            self.submit(stream, self.launch(function, params, gx))
            return (ok,)

        d.cuLaunchKernel = cu_launch_kernel
        return d

    def _runtime(self):
        ok = cudaError_t.cudaSuccess
        r = types.SimpleNamespace(cudaError_t=cudaError_t, cudaStreamNonBlocking=1)
        r.cudaMemcpyKind = types.SimpleNamespace(
            cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2, cudaMemcpyDeviceToDevice=3
        )
        r.cudaStreamCaptureMode = types.SimpleNamespace(
            cudaStreamCaptureModeGlobal=0, cudaStreamCaptureModeThreadLocal=1
        )
        r.cudaGetErrorString = lambda status: (ok, b"emulated error")
        r.cudaGetDeviceCount = lambda: (ok, 1)
        r.cudaSetDevice = lambda device: (ok,)
        r.cudaFree = lambda address: (
            (ok,)
            if address == 0 or self.memory.pop(int(address), None) is not None
            else (cudaError_t.cudaErrorInvalidValue,)
        )
        r.cudaGetDeviceProperties = lambda device: (
            ok,
            types.SimpleNamespace(name=b"Emulated GPU\0\0", major=9, minor=0),
        )
        r.cudaMalloc = lambda nbytes: (ok, self.alloc(nbytes))
        streams = iter(range(0x5000, 0x6000))
        r.cudaStreamCreateWithFlags = lambda flags: (ok, next(streams))
        r.cudaStreamDestroy = lambda stream: (ok,)
        r.cudaStreamSynchronize = lambda stream: (
            (ok,) if int(stream) not in self.capturing else (cudaError_t.cudaErrorStreamCaptureUnsupported,)
        )

        def memcpy(dst, src, nbytes, kind, stream):
            if kind != 3 and int(stream) in self.capturing:
                return (cudaError_t.cudaErrorStreamCaptureUnsupported,)  # host copies cannot be captured
            if kind in (2, 3):
                self.check_range(int(src), nbytes, "cudaMemcpy source")
            if kind in (1, 3):
                self.check_range(int(dst), nbytes, "cudaMemcpy destination")
            self.submit(stream, lambda: ctypes.memmove(int(dst), int(src), nbytes))
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
        r.cudaGraphDestroy = lambda graph: (
            (ok,) if self.graphs.pop(graph, None) is not None else (cudaError_t.cudaErrorInvalidValue,)
        )
        r.cudaGraphExecDestroy = lambda graph_exec: (ok,)

        def graph_launch(graph_exec, stream):
            for work in graph_exec[1]:
                self.submit(stream, work)
            return (ok,)

        r.cudaGraphLaunch = graph_launch
        return r
