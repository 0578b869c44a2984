"""OpenVINO backend: the same ONNX file on OpenVINO's CPU plugin, in bf16 where the CPU runs it natively (AMX,
AVX512-BF16), else fp32. The precision is always set explicitly (INFERENCE_PRECISION_HINT): OpenVINO's own
default turns bf16 on by itself on such CPUs, and a default may change between releases.

In bf16, the rows at the noisiest timesteps run in fp32: there x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies
the model's error by sqrt((1 - abar) / abar), and bf16's 8-bit mantissa at those few steps is what moves whole DDPM
trajectories (measured: fp32 for t >= 900 of the shipped cosine schedule lifts the worst image of a 100-step DDPM
run from 31 to 45 dB PSNR against fp32). A row's precision depends on its own timestep only, so batches stay exact.

OpenVinoGraph compiles one model per (precision, input shapes) (static shapes: measured faster than one
dynamic-batch model, see bench/results), on first use (about 0.6 s for the shipped model), and keeps the last 32;
one infer request per concurrent caller; inputs and the output shared with the caller's arrays (no copies).
Latency settings: one stream, INFERENCE_NUM_THREADS = the threads asked for (default: physical cores). The U-Net
backend pads a forward to a row bucket (up to 8 rows exact, then multiples of 8) so that a server whose batch
changes at every step compiles a handful of shapes, not one per row count; padded rows change no other row
(batch invariance, measured) and are dropped.
"""

import collections
import queue
import threading

import numpy as np

from ddengine.backends.base import Backend, BackendError, host_inputs, physical_cores

PRECISIONS = ("auto", "bf16", "fp32")
HINTS = {"bf16": "bf16", "fp32": "f32"}  # our name -> INFERENCE_PRECISION_HINT
CACHED_SHAPES = 32
EXACT_ROWS = 8  # forwards of up to this many rows compile for their own row count; larger ones for a multiple of 8
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
    """ "auto" -> "bf16" where native, else "fp32"; other values are checked."""
    if precision not in PRECISIONS:
        raise BackendError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if native_bf16(core) else "fp32"
    return precision


class OpenVinoGraph:
    """Any ONNX file on OpenVINO's CPU plugin: infer(inputs by name, out) at a given precision, compiled per shape."""

    def __init__(self, path, precision="auto", threads=None):
        ov = self.ov = import_openvino()
        self.path, self.core = path, ov.Core()
        self.precision = resolve_precision(precision, self.core)
        self.config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads or physical_cores()),
        }
        try:
            self.graph = self.core.read_model(str(path))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses of its own
            raise BackendError(f"OpenVINO could not read {path}: {_first_line(err)}") from None
        self.output = self.graph.outputs[0].get_any_name()
        self._compiled = collections.OrderedDict()  # (precision, shapes) -> (CompiledModel, idle InferRequests)
        self._lock = threading.Lock()

    def compile(self, shapes, precision=None):
        """The compiled model and idle-request queue for {input name: shape} (compiled once, then cached)."""
        precision = precision or self.precision
        key = (precision, tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
        with self._lock:
            entry = self._compiled.get(key)
            if entry is not None:
                self._compiled.move_to_end(key)
                return entry
        if self.graph is None:
            raise BackendError(f"OpenVINO graph {self.path} is closed")
        graph = self.graph.clone()
        graph.reshape({name: list(shape) for name, shape in shapes.items()})
        try:
            compiled = self.core.compile_model(
                graph, "CPU", {**self.config, "INFERENCE_PRECISION_HINT": HINTS[precision]}
            )
        except Exception as err:
            raise BackendError(
                f"OpenVINO could not compile {self.path} for inputs {dict(shapes)} ({precision}): {_first_line(err)}"
            ) from None
        with self._lock:
            entry = self._compiled.setdefault(key, (compiled, queue.SimpleQueue()))
            while len(self._compiled) > CACHED_SHAPES:
                self._compiled.popitem(last=False)
        return entry

    def infer(self, inputs, out=None, precision=None):
        """The first output for {input name: array}: into `out` (float32) when given, else a new array."""
        compiled, idle = self.compile({k: v.shape for k, v in inputs.items()}, precision)
        try:
            request = idle.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            for name, value in inputs.items():
                request.set_tensor(name, self.ov.Tensor(np.ascontiguousarray(value), shared_memory=True))
            if out is not None and out.dtype == np.float32 and out.flags.c_contiguous:
                request.set_tensor(self.output, self.ov.Tensor(out, shared_memory=True))
                request.infer()
                return out
            request.infer()
            result = request.get_tensor(self.output).data
            if out is None:
                return result.copy()
            np.copyto(out, result, casting="same_kind")
            return out
        except Exception as err:
            raise BackendError(f"OpenVINO: the forward of {self.path} failed: {_first_line(err)}") from None
        finally:
            idle.put(request)

    def compiled_shapes(self):
        """(precision, ((input name, shape), ...)) of each compiled model in the cache, oldest first."""
        with self._lock:
            return list(self._compiled)

    def close(self):
        """Drop the compiled models (OpenVINO frees them with their last reference)."""
        with self._lock:
            self._compiled.clear()
        self.graph = None


class OpenVinoBackend(Backend):
    """A ddengine ONNX model on OpenVINO's CPU plugin (Backend protocol: run host arrays into `out`)."""

    def __init__(self, model, *, threads=None, name="openvino", precision="auto"):
        self.name, self.spec = name, model.spec
        self.graph = OpenVinoGraph(model.path, precision, threads)
        self.precision = self.graph.precision
        abar = self.spec.schedule.alphas_cumprod()
        noisiest = np.sqrt((1.0 - abar) / abar) > FP32_AMPLIFICATION
        self.fp32_at = noisiest if self.precision == "bf16" else np.zeros_like(noisiest)  # by timestep index
        self.graph.compile(self._shapes(1))  # a model the plugin cannot compile fails here, not at the first forward

    def _shapes(self, rows):
        return {self.spec.io[r].name: self.spec.io[r].at(rows) for r in self.spec.roles()}

    def run(self, feeds, out):
        """One forward: `out` (float32, C-contiguous, (rows, C, H, W)) receives the model output."""
        if self.graph.graph is None:
            raise BackendError(f"{self.name}: the backend is closed")
        fp32 = self.fp32_at[np.asarray(feeds["timestep"], dtype=np.int64)]
        if fp32.all() or not fp32.any():
            return self.run_at("fp32" if fp32.all() else self.precision, feeds, out)
        for precision, picked in (("fp32", np.flatnonzero(fp32)), (self.precision, np.flatnonzero(~fp32))):
            part = np.empty((len(picked), *out.shape[1:]), dtype=out.dtype)
            self.run_at(precision, {role: a[picked] for role, a in feeds.items() if a is not None}, part)
            out[picked] = part
        return out

    def run_at(self, precision, feeds, out):
        """The forward of every row at one precision, padded to its row bucket (the last row repeated, then dropped)."""
        rows, padded = len(out), bucket(len(out))
        if padded == rows:
            return self._infer(precision, feeds, out)
        take = np.minimum(np.arange(padded), rows - 1)
        full = np.empty((padded, *out.shape[1:]), dtype=np.float32)
        self._infer(precision, {role: a[take] for role, a in feeds.items()}, full)
        out[:] = full[:rows]
        return out

    def _infer(self, precision, feeds, out):
        try:
            return self.graph.infer(host_inputs(self.spec, feeds), out, precision)
        except BackendError as err:
            raise BackendError(f"{self.name}: {err} ({len(out)} rows)") from None

    def compiled_shapes(self):
        """(precision, ((input name, shape), ...)) of each compiled model in the cache, oldest first."""
        with self._lock:
            return list(self._compiled)

    def close(self):
        self.graph.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bucket(rows):
    """The row count a forward of `rows` rows is compiled for: itself up to EXACT_ROWS, else the next multiple of 8."""
    return rows if rows <= EXACT_ROWS else -(-rows // 8) * 8


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
