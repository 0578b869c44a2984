"""TensorRT backend: runs an engine built by `ddengine build`, after checking its manifest and sha256.

An engine file is executable code (TensorRT docs, "Security Considerations"), so it is deserialized only
when its manifest (engine/backends/trt_manifest.py) matches this machine and its bytes hash to the recorded sha256.
Every TensorRT call that reports failure by returning None/False raises with the logger's captured text.
One execution context per concurrent caller (TensorRT is thread-safe only across contexts).
tensorrt and cuda-python are imported lazily, when a backend is created.
"""

import collections
import logging
import queue
import shlex
from pathlib import Path

import numpy as np

from ddengine.backends import trt_manifest as mf
from ddengine.backends.base import Backend, BackendError, DeviceRunner, host_inputs
from ddengine.model.spec import OUTPUT_ROLE

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
        raise TensorRTMissingError(
            f"TensorRT is not installed ({err}); install the GPU extra: {INSTALL_HINT}"
        ) from None
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
    """The manifest fields an engine must match to run here (trt_manifest.KEY_FIELDS)."""
    import ddengine
    from ddengine.gpu import driver

    name, capability = driver.gpu_properties(device)
    key = {
        "tensorrt_version": trt.__version__,
        "gpu_name": name,
        "compute_capability": capability,
        "os": mf.current_os(),
        "ddengine_version": ddengine.__version__,
    }
    if onnx_sha256 is not None:
        key["onnx_sha256"] = onnx_sha256
    return key


def wanted_on_load(manifest_key, here):
    """Drop the GPU fields for an Ampere+ hardware-compatible engine, which runs on any GPU of compute >= 8.0."""
    if manifest_key.get("hardware_compat") != "ampere+":
        return here
    major = int(str(here["compute_capability"]).split(".")[0])
    if major < 8:
        raise BackendError(
            f"engine was built Ampere+ compatible (compute capability >= 8.0), this GPU has "
            f"{here['compute_capability']}"
        )
    return {k: v for k, v in here.items() if k not in ("gpu_name", "compute_capability")}


class TensorRTBackend(Backend):
    """A TensorRT engine on one GPU: `run` for host arrays, `open_runner` for the device loop (engine/runtime/device_loop.py)."""

    precision = "fp16"
    opens_device_runners = True

    def __init__(self, engine_path, spec, *, onnx_sha256=None, device=0, name="tensorrt"):
        from ddengine.gpu.driver import use_device

        self.name, self.device, self.engine_path, self.spec = name, device, Path(engine_path), spec
        trt = self.trt = import_tensorrt()
        self.manifest = mf.read_manifest(self.engine_path)
        here = runtime_key(trt, device, onnx_sha256)
        mf.check_manifest(self.engine_path, self.manifest, wanted_on_load(self.manifest["key"], here))
        data = mf.read_verified_engine(self.engine_path, self.manifest)
        use_device(device)
        self.logger = make_logger(trt)
        self._runtime = checked(trt.Runtime(self.logger), "Runtime()", self.logger)
        self.engine = checked(
            self._runtime.deserialize_cuda_engine(data), f"deserialize_cuda_engine({self.engine_path})", self.logger
        )
        check_engine_io(spec, engine_io(trt, self.engine))
        self.precision = self.manifest["key"]["precision"]
        self.min_rows, _, self.max_rows = (int(b) for b in self.manifest["key"]["profile"]["engine_batch"])
        self._idle = queue.SimpleQueue()  # HostSessions not in use (one per concurrent `run` caller)

    def open_runner(self, stream):
        """A new execution context bound to `stream`: one per concurrent caller / captured CUDA graph."""
        return TrtRunner(self, stream)

    def run(self, feeds, out):
        """Backend protocol: one forward of host arrays into `out` (float32), on a per-caller context."""
        try:
            session = self._idle.get_nowait()
        except queue.Empty:
            session = HostSession(self)
        try:
            return session.run(feeds, out)
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


def create(model, *, name="tensorrt", engine=None, device=0):
    """create_backend-style factory: the engine `engine`, else the one `ddengine build` made from `model` (a
    ddengine.model.load.Model; find_engine). The engine must have been built from exactly this ONNX file (its
    content hash is checked against the manifest)."""
    path = Path(engine) if engine is not None else find_engine(model, device)
    if not path.is_file():
        raise BackendError(f"TensorRT engine {path} does not exist; build it with `{build_command(model.path)}`")
    return TensorRTBackend(path, model.spec, onnx_sha256=model.sha256, device=device, name=name)


def find_engine(model, device=0):
    """The engine for `model`: the newest its index (MODEL.engines.json) records, then MODEL.plan, whose manifest
    matches this model and machine; else the newest one's mismatch, or BackendError naming where it looked."""
    found = [path for path in engine_candidates(model.path) if path.is_file()]
    if not found:
        raise BackendError(
            f"no TensorRT engine for {model.path}: none recorded in {mf.index_path(model.path)} and no "
            f"{Path(model.path).with_suffix('.plan')}; build one with `{build_command(model.path)}`"
        )
    here = runtime_key(import_tensorrt(), device, model.sha256)
    errors = []
    for path in found:
        try:
            manifest = mf.read_manifest(path)
            mf.check_manifest(path, manifest, wanted_on_load(manifest["key"], here))
            return path
        except BackendError as err:  # ManifestError, EngineMismatchError, an Ampere+ engine on an older GPU
            errors.append(err)
    raise errors[0]


def engine_candidates(onnx_path):
    """Where `ddengine build` put engines for `onnx_path`: its index's entries, newest first, then MODEL.plan."""
    paths = [*mf.read_index(onnx_path), Path(onnx_path).with_suffix(".plan")]
    return list(dict.fromkeys(path.resolve() for path in paths))


def build_command(onnx_path):
    """`ddengine build MODEL_DIR` for the U-Net of a text-to-image folder, else `ddengine build MODEL.onnx`."""
    from ddengine.model.pipeline_spec import PIPELINE_FILE

    folder = Path(onnx_path).parent
    return f"ddengine build {shlex.quote(str(folder if (folder / PIPELINE_FILE).is_file() else onnx_path))}"


def engine_io(trt, engine):
    """{tensor name: {"mode": "input"|"output", "dtype": numpy dtype name, "shape": [dims, -1 = dynamic]}}."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        io[name] = {"mode": mode, "dtype": dtype, "shape": [int(d) for d in engine.get_tensor_shape(name)]}
    return io


def check_engine_io(spec, io):
    """The engine's tensors are the ONNX model's (spec.io): same names, directions and dtypes."""
    for role, tensor in spec.io.items():
        want = "output" if role == OUTPUT_ROLE else "input"
        got = io.get(tensor.name)
        if got is None or got["mode"] != want:
            raise BackendError(f"engine lacks {want} tensor {tensor.name!r} ({role}); its I/O tensors are {sorted(io)}")
        if got["dtype"] != tensor.dtype:
            raise BackendError(
                f"engine tensor {tensor.name!r} ({role}) is {got['dtype']}, the ONNX model's is {tensor.dtype}; "
                f"rebuild the engine from this model with `ddengine build`"
            )


class TrtRunner(DeviceRunner):
    """One execution context on one stream: bind device buffers for a row count, then enqueue forwards."""

    supports_capture = True  # execute_async_v3 may be captured into a CUDA graph after one warm-up enqueue

    def __init__(self, backend, stream):
        super().__init__(backend, stream)
        self.logger = backend.logger
        self.context = checked(backend.engine.create_execution_context(), "create_execution_context()", self.logger)

    def bind(self, rows, addresses):
        """Set input shapes for `rows` and every tensor's device address (all return values checked)."""
        lo, hi = self.backend.min_rows, self.backend.max_rows
        if not lo <= rows <= hi:
            raise BackendError(
                f"{rows} forward rows are outside the engine's profile [{lo}, {hi}] (images, doubled "
                f"under guidance); rebuild with another `ddengine build --batch MIN:OPT:MAX`"
            )
        self._since = self.logger.mark()
        super().bind(rows, addresses)

    def _bind_tensor(self, role, name, rows, address):
        if role != OUTPUT_ROLE:
            shape = self.shape(role, rows)
            checked(
                self.context.set_input_shape(name, shape),
                f"set_input_shape({name!r}, {shape})",
                self.logger,
                self._since,
            )
        checked(
            self.context.set_tensor_address(name, address), f"set_tensor_address({name!r})", self.logger, self._since
        )

    def enqueue(self):
        """Queue one forward on the stream; False from execute_async_v3 raises (it never fails silently)."""
        since = self.logger.mark()
        checked(self.context.execute_async_v3(int(self.stream)), "execute_async_v3", self.logger, since)

    def close(self):
        self.context = None


class HostSession:
    """A runner, its stream and device buffers sized for the profile's max rows, for host-array `run` calls."""

    def __init__(self, backend):
        from ddengine.gpu.driver import use_device
        from ddengine.gpu.memory import DeviceArray, Stream

        use_device(backend.device)
        self.backend, self.stream = backend, Stream()
        self.runner = backend.open_runner(self.stream)
        rows = backend.max_rows
        self.buffers = {
            role: DeviceArray(self.runner.shape(role, rows), self.runner.dtype(role))
            for role in backend.spec.io
            if not (role == "timestep" and backend.spec.io[role].scalar)
        }
        if "timestep" not in self.buffers:
            self.buffers["timestep"] = DeviceArray(1, self.runner.dtype("timestep"))

    def run(self, feeds, out):
        from ddengine.gpu.driver import use_device

        use_device(self.backend.device)  # this session may be reused from another thread
        rows = len(out)
        inputs = host_inputs(self.backend.spec, feeds)
        for role in self.backend.spec.roles():
            self.buffers[role].upload(inputs[self.backend.spec.io[role].name], self.stream)
        self.runner.bind(rows, {role: buffer.ptr for role, buffer in self.buffers.items()})
        self.runner.enqueue()
        result = self.buffers[OUTPUT_ROLE].download(self.stream, shape=out.shape)
        np.copyto(out, result, casting="same_kind")
        return out

    def close(self):
        self.runner.close()
        for buffer in self.buffers.values():
            buffer.free()
        self.stream.close()
