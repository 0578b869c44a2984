"""TensorRT backend: runs an engine built by `ddengine build`, after checking its manifest and sha256.

An engine file is executable code (TensorRT docs, "Security Considerations"), so it is deserialized only
when its manifest (export/manifest.py) matches this machine and its bytes hash to the recorded sha256.
Every TensorRT call that reports failure by returning None/False raises with the logger's captured text.
One execution context per concurrent caller (TensorRT is thread-safe only across contexts).
tensorrt and cuda-python are imported lazily, when a backend is created.
"""
import collections
import json
import logging
import queue
from pathlib import Path

import numpy as np

from ddengine.backends.base import BackendError

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install ddengine[gpu]"


class TensorRTMissingError(BackendError):
    """The tensorrt package is not installed."""


class TensorRTError(BackendError):
    """A TensorRT call returned None/False; the message carries TensorRT's own log."""


def import_tensorrt():
    """The tensorrt module, or TensorRTMissingError naming the extra to install."""
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTMissingError(f"TensorRT is not installed ({err}); install the GPU extra: {INSTALL_HINT}") from None
    return tensorrt


def make_logger(trt, keep=1000):
    """A trt.ILogger keeping the last `keep` warnings/errors (numbered, so a call can ask for what it caused)."""
    serious = (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR, trt.ILogger.Severity.WARNING)

    class CapturingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.records = collections.deque(maxlen=keep)  # (number, severity, message)
            self.count = 0

        def log(self, severity, msg):
            if severity not in serious:
                log.debug("TensorRT: %s", msg)
                return
            self.records.append((self.count, severity, str(msg)))
            self.count += 1
            level = logging.WARNING if severity == trt.ILogger.Severity.WARNING else logging.ERROR
            log.log(level, "TensorRT: %s", msg)

        def mark(self):
            """A position to pass to text(): only messages logged after it are reported."""
            return self.count

        def text(self, since=0):
            """Warnings and errors logged since mark `since`, one per line."""
            lines = [f"[{getattr(s, 'name', s)}] {m}" for n, s, m in self.records if n >= since]
            return "\n".join(lines) or "(TensorRT logged no warning or error)"

    return CapturingLogger()


def checked(value, what, logger, since=0):
    """`value` unless it is None/False (TensorRT's way to fail), else TensorRTError with the log."""
    if value is None or value is False:
        raise TensorRTError(f"TensorRT {what} failed:\n{logger.text(since)}")
    return value


def runtime_key(trt, device=0, onnx_sha256=None):
    """The manifest fields an engine must match to run here (export/manifest.py KEY_FIELDS)."""
    import ddengine
    from ddengine.cuda_step import gpu_properties
    from ddengine.export.manifest import current_os

    name, capability = gpu_properties(device)
    key = {"tensorrt_version": trt.__version__, "gpu_name": name, "compute_capability": capability,
           "os": current_os(), "ddengine_version": ddengine.__version__}
    if onnx_sha256 is not None:
        key["onnx_sha256"] = onnx_sha256
    return key


def wanted_on_load(manifest_key, here):
    """Drop the GPU fields for an Ampere+ hardware-compatible engine, which runs on any GPU of compute >= 8.0."""
    if manifest_key.get("hardware_compat") != "ampere+":
        return here
    major = int(str(here["compute_capability"]).split(".")[0])
    if major < 8:
        raise BackendError(f"engine was built Ampere+ compatible (compute capability >= 8.0), this GPU has "
                           f"{here['compute_capability']}")
    return {k: v for k, v in here.items() if k not in ("gpu_name", "compute_capability")}


class TensorRTBackend:
    """A TensorRT engine on one GPU: `run` for host arrays, `open_runner` for device-side loops (gpu_sampler)."""

    def __init__(self, engine_path, *, onnx_sha256=None, device=0, name="tensorrt"):
        from ddengine.cuda_step import use_device
        from ddengine.export import manifest as mf
        from ddengine.spec import ModelSpec

        self.name, self.device, self.engine_path = name, device, Path(engine_path)
        trt = self.trt = import_tensorrt()
        self.manifest = mf.read_manifest(self.engine_path)
        here = runtime_key(trt, device, onnx_sha256)
        mf.check_manifest(self.engine_path, self.manifest, wanted_on_load(self.manifest["key"], here))
        data = mf.read_verified_engine(self.engine_path, self.manifest)
        use_device(device)
        self.logger = make_logger(trt)
        self._runtime = checked(trt.Runtime(self.logger), "Runtime()", self.logger)
        self.engine = checked(self._runtime.deserialize_cuda_engine(data), f"deserialize_cuda_engine({self.engine_path})", self.logger)
        self.spec = ModelSpec.from_json(json.dumps(self.manifest["spec"]))
        self.io = engine_io(trt, self.engine)
        self.names = io_names(self.spec, self.io)
        self.min_batch, _, self.max_batch = (int(b) for b in self.manifest["key"]["profile"]["engine_batch"])
        self._idle = queue.SimpleQueue()  # HostSessions not in use (one per concurrent `run` caller)

    def open_runner(self, stream):
        """A new execution context bound to `stream`: one per concurrent caller / captured CUDA graph."""
        return TrtRunner(self, stream)

    def run(self, sample, timestep, class_labels, out):
        """Backend protocol: one forward of host arrays into `out` (float32), on a per-caller context."""
        try:
            session = self._idle.get_nowait()
        except queue.Empty:
            session = HostSession(self)
        try:
            return session.run(sample, timestep, class_labels, out)
        finally:
            self._idle.put(session)

    def close(self):
        """Free the contexts, device buffers and the engine."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self.engine = self._runtime = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def create(model, *, provider=None, threads=None, name="tensorrt", engine=None, device=0):
    """create_backend-style factory: the engine built from `model` (a ddengine.model.Model), default MODEL.plan.

    The engine must have been built from exactly this ONNX file (its content hash is checked against the manifest).
    """
    from ddengine.export.trt_build import onnx_sha256

    path = Path(engine) if engine is not None else Path(model.path).with_suffix(".plan")
    return TensorRTBackend(path, onnx_sha256=onnx_sha256(model.path), device=device, name=name)


def engine_io(trt, engine):
    """{tensor name: {"mode": "input"|"output", "dtype": numpy dtype name, "shape": [dims, -1 = dynamic]}}."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        io[name] = {"mode": mode, "dtype": dtype, "shape": [int(d) for d in engine.get_tensor_shape(name)]}
    return io


def io_names(spec, io):
    """The engine's sample/timestep/class_labels/out tensor names, checked against the spec (float32 sample and out)."""
    names = {"sample": spec.input_names["sample"], "timestep": spec.input_names["timestep"],
             "class_labels": spec.input_names.get("class_labels") if spec.conditional else None,
             "out": spec.output_name}
    for role, name in names.items():
        if name is None:
            continue
        want = "output" if role == "out" else "input"
        if name not in io or io[name]["mode"] != want:
            raise BackendError(f"engine lacks {want} tensor {name!r} ({role}); its I/O tensors are {sorted(io)}")
    for role in ("sample", "out"):
        if io[names[role]]["dtype"] != "float32":
            raise BackendError(f"engine tensor {names[role]!r} is {io[names[role]]['dtype']}, expected float32 "
                               f"(export the fp16 ONNX with float32 inputs/outputs: `ddengine export --fp16`)")
    return names


class TrtRunner:
    """One execution context on one stream: bind device buffers for a batch, then enqueue forwards."""

    supports_capture = True  # execute_async_v3 may be captured into a CUDA graph after one warm-up enqueue

    def __init__(self, backend, stream):
        self.backend, self.stream = backend, stream
        self.logger = backend.logger
        self.context = checked(backend.engine.create_execution_context(), "create_execution_context()", self.logger)

    def dtype(self, role):
        """numpy dtype the engine expects for a role ("sample", "timestep", "class_labels", "out")."""
        return np.dtype(self.backend.io[self.backend.names[role]]["dtype"])

    def shape(self, role, batch):
        """The tensor's shape at this batch (its dynamic axis 0 set to `batch`)."""
        dims = self.backend.io[self.backend.names[role]]["shape"]
        return tuple(batch if d < 0 else d for d in dims)

    def bind(self, batch, *, sample, timestep, class_labels, out):
        """Set input shapes for `batch` and every tensor's device address (all return values checked)."""
        lo, hi = self.backend.min_batch, self.backend.max_batch
        if not lo <= batch <= hi:
            raise BackendError(f"batch {batch} is outside the engine's profile [{lo}, {hi}] (model batch, doubled "
                               f"under guidance); rebuild with another `ddengine build --batch MIN:OPT:MAX`")
        since = self.logger.mark()
        addresses = {"sample": sample, "timestep": timestep, "class_labels": class_labels, "out": out}
        for role, address in addresses.items():
            name = self.backend.names[role]
            if name is None:
                continue
            if address is None:
                raise BackendError(f"engine input {name!r} ({role}) needs a device buffer, got None")
            if role != "out":
                shape = self.shape(role, batch)
                checked(self.context.set_input_shape(name, shape), f"set_input_shape({name!r}, {shape})", self.logger, since)
            checked(self.context.set_tensor_address(name, int(address)), f"set_tensor_address({name!r})", self.logger, since)

    def enqueue(self):
        """Queue one forward on the stream; False from execute_async_v3 raises (it never fails silently)."""
        since = self.logger.mark()
        checked(self.context.execute_async_v3(int(self.stream)), "execute_async_v3", self.logger, since)

    def close(self):
        self.context = None


class HostSession:
    """A runner, its stream and device buffers sized for the profile's max batch, for host-array `run` calls."""

    def __init__(self, backend):
        from ddengine.cuda_step import DeviceArray, Stream, use_device

        use_device(backend.device)
        self.stream = Stream()
        self.runner = backend.open_runner(self.stream)
        b, spec = backend.max_batch, backend.spec
        image = (spec.channels, spec.height, spec.width)
        self.buffers = {"sample": DeviceArray((b, *image), np.float32), "out": DeviceArray((b, *image), np.float32),
                        "timestep": DeviceArray(max(b, 1), self.runner.dtype("timestep"))}
        if backend.names["class_labels"] is not None:
            self.buffers["class_labels"] = DeviceArray(b, self.runner.dtype("class_labels"))

    def run(self, sample, timestep, class_labels, out):
        from ddengine.cuda_step import use_device

        use_device(self.runner.backend.device)  # this session may be reused from another thread
        b = sample.shape[0]
        if out.shape != sample.shape or out.dtype != np.float32:
            raise BackendError(f"out must be float32 of shape {sample.shape}, got {out.dtype} {out.shape}")
        t_shape = self.runner.shape("timestep", b)
        self.buffers["sample"].upload(sample, self.stream)
        self.buffers["timestep"].upload(np.full(t_shape, timestep, dtype=self.runner.dtype("timestep")), self.stream)
        if "class_labels" in self.buffers:
            if class_labels is None or len(class_labels) != b:
                raise BackendError(f"this conditional engine needs {b} class labels, got "
                                   f"{None if class_labels is None else len(class_labels)}")
            self.buffers["class_labels"].upload(class_labels, self.stream)
        self.runner.bind(b, sample=self.buffers["sample"], timestep=self.buffers["timestep"],
                         class_labels=self.buffers.get("class_labels"), out=self.buffers["out"])
        self.runner.enqueue()
        np.copyto(out, self.buffers["out"].download(self.stream, shape=out.shape))
        return out

    def close(self):
        self.runner.close()
        for buffer in self.buffers.values():
            buffer.free()
        self.stream.close()
