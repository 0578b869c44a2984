"""ONNX Runtime backend: one InferenceSession reused for every call, outputs bound into the caller's buffer."""

import numpy as np
import onnxruntime as ort

from ddengine.backends.base import Backend, BackendError, host_inputs, physical_cores
from ddengine.model.spec import OUTPUT_ROLE


def session_options(threads=None):
    """Sequential execution, intra-op threads = physical cores, no spinning between the step kernel's runs."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning pool threads would steal the cores the fused step kernel runs on between forwards.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class OrtBackend(Backend):
    """Runs a ddengine ONNX model with one ONNX Runtime execution provider (CPU, CUDA or TensorRT)."""

    precision = "fp32"

    def __init__(self, model, *, provider="CPUExecutionProvider", threads=None, name="ort-cpu"):
        self.name, self.spec = name, model.spec
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(
                str(model.path), sess_options=session_options(threads), providers=providers
            )
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
            raise BackendError(f"ONNX Runtime could not load {model.path}: {err}") from None
        self._out = self.spec.io[OUTPUT_ROLE]
        self._direct = provider == "CPUExecutionProvider" and self._out.dtype == "float32"

    def run(self, feeds, out):
        """One forward: `out` (float32, C-contiguous, (rows, C, H, W)) receives the model output."""
        if self.session is None:
            raise BackendError(f"{self.name}: the backend is closed")
        binding = self.session.io_binding()  # one per call: IOBinding objects are not thread-safe
        for name, value in host_inputs(self.spec, feeds).items():
            binding.bind_cpu_input(name, value)
        if self._direct:
            binding.bind_output(self._out.name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        else:
            binding.bind_output(self._out.name, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:  # ORT's Fail / RuntimeException (e.g. out of memory)
            raise BackendError(f"{self.name}: the model's forward failed for {len(out)} rows: {err}") from None
        if not self._direct:
            np.copyto(out, binding.copy_outputs_to_cpu()[0], casting="same_kind")
        return out

    def close(self):
        """Drop the session (ORT frees its memory when the last reference goes)."""
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
