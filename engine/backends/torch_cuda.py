"""torch-CUDA backend: the model's torch twin (engine/nets/twin.py) on the GPU in fp16 or bf16, for users without
TensorRT (the ground stable-fast and OneDiff serve). The device loop (engine/runtime/device_loop.py) launches our NVRTC step
kernel on the backend's torch stream and captures the whole step (forward, fused step, advance) in one
torch.cuda.CUDAGraph per (plan, batch), replayed for every step; `graphs=False` is the eager fallback.
"""

import numpy as np

from ddengine.backends.base import Backend, BackendError, DeviceRunner
from ddengine.model.spec import OUTPUT_ROLE

PRECISIONS = ("fp16", "bf16")
_TYPESTR = {"float32": "<f4", "float16": "<f2", "int64": "<i8", "int32": "<i4"}


class TorchCudaBackend(Backend):
    """The torch twin of a model on one CUDA device; `run` takes host arrays, `open_runner` device buffers."""

    opens_device_runners = True

    def __init__(self, model, *, name="torch-cuda", precision="fp16", channels_last=True, device=0, twin=None):
        torch = import_torch()
        from ddengine.nets.twin import TwinError, load_twin, twin_path

        if not torch.cuda.is_available():
            raise BackendError(
                "backend 'torch-cuda' needs a CUDA GPU visible to torch; torch.cuda.is_available() is False"
            )
        if precision not in PRECISIONS:
            raise BackendError(f"torch-cuda precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        try:
            net = load_twin(twin if twin is not None else twin_path(model.path))
        except TwinError as err:
            raise BackendError(f"backend 'torch-cuda' runs the model's torch twin: {err}") from None
        self.name, self.spec, self.precision, self.device = name, model.spec, precision, device
        self.dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(device=f"cuda:{device}", dtype=self.dtype, memory_format=self.memory_format).eval()

    def forward(self, sample, timestep, class_labels):
        """The twin's output (float) for torch tensors on the device; the caller picks the stream."""
        torch = import_torch()
        with torch.inference_mode():
            x = sample.to(dtype=self.dtype, memory_format=self.memory_format)
            return self.net(x, timestep, class_labels if self.spec.conditional else None)

    def run(self, feeds, out):
        """One forward of host arrays into `out` (float32 host array)."""
        torch = import_torch()
        device = f"cuda:{self.device}"
        tensors = {role: torch.from_numpy(np.ascontiguousarray(feeds[role])).to(device) for role in self.spec.roles()}
        y = self.forward(tensors["sample"], tensors["timestep"], tensors.get("class_labels"))
        out[:] = y.float().cpu().numpy()
        return out

    def stream(self):
        """A new torch CUDA stream for a device loop (our kernels launch on its handle)."""
        return TorchStream(self.device)

    def open_runner(self, stream):
        return TorchRunner(self, stream)

    def close(self):
        self.net = None


class TorchStream:
    """A torch.cuda.Stream with the Stream interface of engine/gpu/memory.py (int() is its cudaStream_t)."""

    def __init__(self, device):
        torch = import_torch()
        self.torch = torch.cuda.Stream(device=device)

    def synchronize(self):
        self.torch.synchronize()

    def close(self):
        self.torch = None

    def __int__(self):
        return int(self.torch.cuda_stream)


class TorchRunner(DeviceRunner):
    """The twin's forward on device buffers (wrapped as torch tensors without a copy), capturable by torch."""

    supports_capture = True
    owns_capture = True

    def __init__(self, backend, stream):
        super().__init__(backend, stream)
        self.tensors = {}

    def _bind_tensor(self, role, name, rows, address):
        self.tensors[role] = wrap_device(address, self.shape(role, rows), self.spec.io[role].dtype, self.backend.device)

    def enqueue(self):
        torch = import_torch()
        t = self.tensors
        with torch.cuda.stream(self.stream.torch):
            t[OUTPUT_ROLE].copy_(self.backend.forward(t["sample"], t["timestep"], t.get("class_labels")))

    def capture(self, body):
        """A torch.cuda.CUDAGraph of body() on this runner's stream (torch's allocator must own the capture)."""
        torch = import_torch()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream.torch):
            body()
        return TorchGraph(graph, self.stream)

    def close(self):
        self.tensors = {}


class TorchGraph:
    """A captured step: launch() replays it on the loop's stream."""

    def __init__(self, graph, stream):
        self.graph, self.stream = graph, stream

    def launch(self):
        torch = import_torch()
        with torch.cuda.stream(self.stream.torch):
            self.graph.replay()

    def close(self):
        self.graph = None


class _CudaArray:
    """A device buffer described by __cuda_array_interface__ (v3), so torch.as_tensor wraps it without copying."""

    def __init__(self, address, shape, dtype):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": _TYPESTR[dtype],
            "data": (int(address), False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def wrap_device(address, shape, dtype, device):
    """A torch tensor over `address` (C-contiguous `shape` of numpy dtype name `dtype`) on cuda:device."""
    torch = import_torch()
    return torch.as_tensor(_CudaArray(address, shape, dtype), device=f"cuda:{device}")


def import_torch():
    try:
        import torch
    except ImportError:
        raise BackendError("backend 'torch-cuda' needs PyTorch with CUDA (pip install torch)") from None
    return torch
