"""OpenVINO backend: the same ONNX file on OpenVINO's CPU plugin, in bf16 where the CPU runs it natively (AMX,
AVX512-BF16), else fp32. The precision is always set explicitly (INFERENCE_PRECISION_HINT): OpenVINO's own
default turns bf16 on by itself on such CPUs, and a default may change between releases.

In bf16, the rows at the noisiest timesteps run in fp32: there x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies
the model's error by sqrt((1 - abar) / abar), and bf16's 8-bit mantissa at those few steps is what moves whole DDPM
trajectories (measured: fp32 for t >= 900 of the shipped cosine schedule lifts the worst image of a 100-step DDPM
run from 31 to 45 dB PSNR against fp32). A row's precision depends on its own timestep only, so batches stay exact.

One compiled model per (precision, forward row count) (static shapes: measured faster than one dynamic-batch model,
see bench/results), compiled on first use and kept (least recently used first out); one infer request per
concurrent caller; inputs and the output shared with the caller's arrays (no copies). Latency settings: one
stream, INFERENCE_NUM_THREADS = the threads asked for (default: physical cores).
"""
import collections
import queue
import threading

import numpy as np

from ddengine.backends.base import BackendError, host_inputs
from ddengine.resources import physical_cores
from ddengine.spec import OUTPUT_ROLE

PRECISIONS = ("auto", "bf16", "fp32")
HINTS = {"bf16": "bf16", "fp32": "f32"}  # our name -> INFERENCE_PRECISION_HINT
CACHED_SHAPES = 8
FP32_AMPLIFICATION = 6.0  # bf16 mode: rows whose sqrt((1 - abar_t) / abar_t) exceeds this run in fp32
INSTALL_HINT = "pip install openvino"


def import_openvino():
    try:
        import openvino
    except ImportError as err:
        raise BackendError(f"backend 'openvino' needs OpenVINO ({err}): {INSTALL_HINT}") from None
    return openvino


def native_bf16(core=None):
    """True where OpenVINO's CPU plugin runs bf16 natively (it lists BF16 in OPTIMIZATION_CAPABILITIES)."""
    core = core or import_openvino().Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(precision, core=None):
    """"auto" -> "bf16" where native, else "fp32"; other values are checked."""
    if precision not in PRECISIONS:
        raise BackendError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(core) else "fp32"
    return precision


class OpenVinoBackend:
    """A ddengine ONNX model on OpenVINO's CPU plugin (Backend protocol: run host arrays into `out`)."""

    def __init__(self, model, *, provider=None, threads=None, name="openvino", precision="auto"):
        ov = self.ov = import_openvino()
        self.name, self.spec, self.path = name, model.spec, model.path
        self.core = ov.Core()
        self.precision = resolve_precision(precision, self.core)
        self.config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads or physical_cores())}
        abar = self.spec.schedule.alphas_cumprod()
        noisiest = np.sqrt((1.0 - abar) / abar) > FP32_AMPLIFICATION
        self.fp32_at = noisiest if self.precision == "bf16" else np.zeros_like(noisiest)  # by timestep index
        try:
            self.graph = self.core.read_model(str(model.path))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
            raise BackendError(f"OpenVINO could not read {model.path}: {_first_line(err)}") from None
        self._compiled = collections.OrderedDict()  # (precision, rows) -> (CompiledModel, idle InferRequests)
        self._lock = threading.Lock()
        self._compile(self.precision, 1)  # a model the plugin cannot compile fails here, not at the first forward

    def _compile(self, precision, rows):
        """The compiled model and idle-request queue for (precision, rows) (compiled once, then cached)."""
        key = (precision, rows)
        with self._lock:
            entry = self._compiled.get(key)
            if entry is not None:
                self._compiled.move_to_end(key)
                return entry
        graph = self.graph.clone()
        graph.reshape({self.spec.io[r].name: list(self.spec.io[r].at(rows)) for r in self.spec.roles()})
        try:
            compiled = self.core.compile_model(graph, "CPU", {**self.config, "INFERENCE_PRECISION_HINT": HINTS[precision]})
        except Exception as err:
            raise BackendError(f"OpenVINO could not compile {self.path} for {rows} rows ({precision}): "
                               f"{_first_line(err)}") from None
        with self._lock:
            entry = self._compiled.setdefault(key, (compiled, queue.SimpleQueue()))
            while len(self._compiled) > CACHED_SHAPES:
                self._compiled.popitem(last=False)
        return entry

    def run(self, feeds, out):
        """One forward: `out` (float32, C-contiguous, (rows, C, H, W)) receives the model output."""
        if self.graph is None:
            raise BackendError(f"{self.name}: the backend is closed")
        fp32 = self.fp32_at[np.asarray(feeds["timestep"], dtype=np.int64)]
        if fp32.all() or not fp32.any():
            return self._infer("fp32" if fp32.all() else self.precision, feeds, out)
        for precision, rows in (("fp32", np.flatnonzero(fp32)), (self.precision, np.flatnonzero(~fp32))):
            part = np.empty((len(rows), *out.shape[1:]), dtype=out.dtype)
            self._infer(precision, {role: np.ascontiguousarray(a[rows]) for role, a in feeds.items() if a is not None}, part)
            out[rows] = part
        return out

    def _infer(self, precision, feeds, out):
        """The forward of all rows at one precision."""
        compiled, idle = self._compile(precision, len(out))
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            for name, value in host_inputs(self.spec, feeds).items():
                request.set_tensor(name, self.ov.Tensor(value, shared_memory=True))
            out_name = self.spec.io[OUTPUT_ROLE].name
            if out.dtype == np.float32 and out.flags.c_contiguous and self.spec.io[OUTPUT_ROLE].dtype == "float32":
                request.set_tensor(out_name, self.ov.Tensor(out, shared_memory=True))
                request.infer()
            else:
                request.infer()
                np.copyto(out, request.get_tensor(out_name).data, casting="same_kind")
        except Exception as err:
            raise BackendError(f"{self.name}: the model's forward failed for {len(out)} rows: {_first_line(err)}") from None
        finally:
            idle.put(request)
        return out

    def close(self):
        """Drop the compiled models (OpenVINO frees them with their last reference)."""
        with self._lock:
            self._compiled.clear()
        self.graph = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
