"""ONNX Runtime's CUDA provider on device buffers (IO binding), so the CUDA step kernel serves it like TensorRT.

`run` (host arrays) is the ONNX Runtime backend's; `open_runner` binds the GPU loop's device buffers by
address. ORT runs on its own stream and `Run` returns after its CUDA work is synchronized (the default
unless the run option `disable_synchronize_execution_providers` is set), so the runner drains our stream
before each forward: correct ordering, but no capture into our CUDA graph (ORT has its own, per session).
"""
import numpy as np

from ddengine.backends.base import BackendError
from ddengine.backends.ort import OrtBackend

PROVIDER = "CUDAExecutionProvider"


class OrtCudaBackend(OrtBackend):
    """An OrtBackend pinned to the CUDA provider on one device; fails instead of falling back to the CPU."""

    def __init__(self, model, *, provider=PROVIDER, threads=None, name="ort-cuda", device=0):
        if provider != PROVIDER:
            raise BackendError(f"OrtCudaBackend runs {PROVIDER} only, got provider {provider!r}")
        super().__init__(model, provider=(PROVIDER, {"device_id": str(device)}), threads=threads, name=name)
        self.device = device
        active = self.session.get_providers()
        if not active or active[0] != PROVIDER:
            raise BackendError(f"ONNX Runtime did not enable {PROVIDER} (active providers: {active}); "
                               f"install onnxruntime-gpu matching this CUDA: pip install ddengine[gpu]")
        self.io = {v.name: {"mode": "input", "dtype": _dtype(v.type), "shape": _shape(v.shape)} for v in self.session.get_inputs()}
        self.io.update({v.name: {"mode": "output", "dtype": _dtype(v.type), "shape": _shape(v.shape)}
                        for v in self.session.get_outputs()})
        self.names = {"sample": self.spec.input_names["sample"], "timestep": self.spec.input_names["timestep"],
                      "class_labels": self.spec.input_names.get("class_labels") if self.spec.conditional else None,
                      "out": self.spec.output_name}
        for role in ("sample", "out"):
            if self.io[self.names[role]]["dtype"] != "float32":
                raise BackendError(f"model tensor {self.names[role]!r} is {self.io[self.names[role]]['dtype']}, "
                                   f"the CUDA step kernel needs float32")

    def open_runner(self, stream):
        """A runner that feeds device buffers to Run through IO binding."""
        return OrtCudaRunner(self, stream)


class OrtCudaRunner:
    """IO binding by device address for one batch; `enqueue` runs one forward after the stream's queued work."""

    supports_capture = False  # Run() synchronizes and may allocate: it cannot sit inside our graph

    def __init__(self, backend, stream):
        self.backend, self.stream = backend, stream
        self.binding = None

    def dtype(self, role):
        return np.dtype(self.backend.io[self.backend.names[role]]["dtype"])

    def shape(self, role, batch):
        return tuple(batch if d < 0 else d for d in self.backend.io[self.backend.names[role]]["shape"])

    def bind(self, batch, *, sample, timestep, class_labels, out):
        """Bind every input and the output to device memory at these addresses, shaped for `batch`."""
        binding = self.backend.session.io_binding()
        addresses = {"sample": sample, "timestep": timestep, "class_labels": class_labels}
        for role, address in addresses.items():
            name = self.backend.names[role]
            if name is None:
                continue
            if address is None:
                raise BackendError(f"model input {name!r} ({role}) needs a device buffer, got None")
            binding.bind_input(name, "cuda", self.backend.device, self.dtype(role).type, list(self.shape(role, batch)), int(address))
        binding.bind_output(self.backend.names["out"], "cuda", self.backend.device, np.float32,
                            list(self.shape("sample", batch)), int(out))  # out has the sample's shape
        self.binding = binding

    def enqueue(self):
        """Drain our stream (inputs ready), then one synchronous Run on ORT's stream."""
        if self.binding is None:
            raise BackendError("bind() must be called before enqueue()")
        self.stream.synchronize()
        self.backend.session.run_with_iobinding(self.binding)

    def close(self):
        self.binding = None


_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


def _dtype(ort_type):
    if ort_type not in _TYPES:
        raise BackendError(f"unsupported ONNX tensor type {ort_type}; expected one of {', '.join(_TYPES)}")
    return _TYPES[ort_type]


def _shape(dims):
    return [d if isinstance(d, int) and d > 0 else -1 for d in dims]
