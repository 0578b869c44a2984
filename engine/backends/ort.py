"""ONNX Runtime backend: one InferenceSession reused for every call, outputs bound into the caller's buffer."""
import os

import numpy as np
import onnxruntime as ort

from ddengine.backends.base import BackendError


def physical_cores():
    """Physical cores this process may use (hyper-thread siblings counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id") as f:
                package = f.read().strip()
        except OSError:
            core, package = str(cpu), "0"
        cores.add((package, core))
    return max(1, len(cores))


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


class OrtBackend:
    """Runs a ddengine ONNX model with one ONNX Runtime execution provider (CPU, CUDA or TensorRT)."""

    def __init__(self, model, *, provider="CPUExecutionProvider", threads=None, name="ort-cpu"):
        self.name = name
        self.spec = model.spec
        providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model.path), sess_options=session_options(threads), providers=providers)
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
            raise BackendError(f"ONNX Runtime could not load {model.path}: {err}") from None
        names = self.spec.input_names
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._x_name, self._t_name = names["sample"], names["timestep"]
        self._c_name = names.get("class_labels") if self.spec.conditional else None
        self._x_dtype = _np_dtype(self._inputs[self._x_name].type)
        self._t_dtype = _np_dtype(self._inputs[self._t_name].type)
        self._t_scalar = len(self._inputs[self._t_name].shape) == 0
        self._c_dtype = _np_dtype(self._inputs[self._c_name].type) if self._c_name else None
        self._out_name = self.spec.output_name
        self._out_dtype = _np_dtype(next(o.type for o in self.session.get_outputs() if o.name == self._out_name))
        self._device = "cuda" if provider != "CPUExecutionProvider" else "cpu"

    def run(self, sample, timestep, class_labels, out):
        """One forward: `out` (float32, C-contiguous, sample's shape) receives the model output."""
        if self.session is None:
            raise BackendError(f"{self.name}: the backend is closed")
        batch = sample.shape[0]
        binding = self.session.io_binding()  # one per call: IOBinding objects are not thread-safe
        binding.bind_cpu_input(self._x_name, _as(sample, self._x_dtype))
        t = np.array(timestep, dtype=self._t_dtype) if self._t_scalar else np.full(batch, timestep, dtype=self._t_dtype)
        binding.bind_cpu_input(self._t_name, t)
        if self._c_name is not None:
            binding.bind_cpu_input(self._c_name, _as(class_labels, self._c_dtype))
        direct = self._device == "cpu" and self._out_dtype == np.float32
        if direct:
            binding.bind_output(self._out_name, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        else:
            binding.bind_output(self._out_name, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        except Exception as err:  # ORT's Fail / RuntimeException (e.g. out of memory)
            raise BackendError(f"{self.name}: the model's forward failed for batch {batch}, timestep {timestep}: {err}") from None
        if not direct:
            np.copyto(out, binding.copy_outputs_to_cpu()[0], casting="same_kind")
        return out

    def close(self):
        """Drop the session (ORT frees its memory when the last reference goes)."""
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _np_dtype(ort_type):
    if ort_type not in _ORT_TYPES:
        raise BackendError(f"unsupported ONNX input/output type {ort_type}; expected one of {', '.join(_ORT_TYPES)}")
    return np.dtype(_ORT_TYPES[ort_type])


def _as(array, dtype):
    return np.ascontiguousarray(array, dtype=dtype)
