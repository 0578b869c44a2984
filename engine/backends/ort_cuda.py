"""ONNX Runtime's CUDA provider on device buffers (IO binding), so the CUDA step kernel serves it like TensorRT.

`run` (host arrays) is the ONNX Runtime backend's; `open_runner` binds the device loop's buffers by address.
ORT runs on its own stream and `Run` returns after its CUDA work is synchronized (the default unless the run
option `disable_synchronize_execution_providers` is set), so the runner drains our stream before each forward:
correct ordering, but no capture into our CUDA graph (ORT has its own, per session).
"""

from ddengine.backends.base import BackendError, DeviceRunner
from ddengine.backends.ort import OrtBackend
from ddengine.model.spec import OUTPUT_ROLE

PROVIDER = "CUDAExecutionProvider"


class OrtCudaBackend(OrtBackend):
    """An OrtBackend pinned to the CUDA provider on one device; fails instead of falling back to the CPU."""

    opens_device_runners = True

    def __init__(self, model, *, threads=None, name="ort-cuda", device=0):
        super().__init__(model, provider=(PROVIDER, {"device_id": str(device)}), threads=threads, name=name)
        self.device = device
        active = self.session.get_providers()
        if not active or active[0] != PROVIDER:
            raise BackendError(
                f"ONNX Runtime did not enable {PROVIDER} (active providers: {active}); "
                f"install onnxruntime-gpu matching this CUDA: pip install ddengine[gpu]"
            )

    def open_runner(self, stream):
        """A runner that feeds device buffers to Run through IO binding."""
        return OrtCudaRunner(self, stream)


class OrtCudaRunner(DeviceRunner):
    """IO binding by device address; `enqueue` runs one forward after the stream's queued work."""

    supports_capture = False  # Run() synchronizes and may allocate: it cannot sit inside our graph

    def __init__(self, backend, stream):
        super().__init__(backend, stream)
        self.binding = backend.session.io_binding()
        self.ready = False

    def _bind_tensor(self, role, name, rows, address):
        shape = list(self.shape(role, rows))
        if role == OUTPUT_ROLE:
            self.binding.bind_output(name, "cuda", self.backend.device, self.dtype(role).type, shape, address)
        else:
            self.binding.bind_input(name, "cuda", self.backend.device, self.dtype(role).type, shape, address)

    def _bound(self):
        self.ready = True

    def enqueue(self):
        """Drain our stream (inputs ready), then one synchronous Run on ORT's stream."""
        if not self.ready:
            raise BackendError("bind() must be called before enqueue()")
        self.stream.synchronize()
        self.backend.session.run_with_iobinding(self.binding)

    def close(self):
        self.binding, self.ready = None, False
