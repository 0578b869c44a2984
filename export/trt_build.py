"""ONNX -> TensorRT engine + manifest (`ddengine build`): strongly typed, one batch profile, a timing cache.

A U-Net (its `ddengine` metadata) gets a profile of model rows, doubled for guidance. `build_pipeline` builds the
U-Net of a text-to-image MODEL_DIR as unet.plan; its text encoder and VAE decoder get no engine, since they run
on the CPU (engine/text/parts.py). Every engine ENGINE.plan has its manifest ENGINE.plan.json and is recorded in
MODEL.engines.json next to its ONNX, where the tensorrt backend looks for it (engine/backends/trt.py find_engine).

TensorRT 11 removed the FP16 builder flag and weak typing ("Migrating from TensorRT 10.x to 11.x"), so
precision comes from the ONNX graph itself: fp16 needs the mixed-precision ONNX of `ddengine export --fp16`
and no BuilderFlag is ever set for it. Every None/False return raises with the parser's errors and the
logger's text; the engine and then its manifest are written atomically, and an engine whose manifest
matches the cache key is reused instead of rebuilt.
"""

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

import onnx

from ddengine.backends import trt_manifest as mf
from ddengine.backends.trt import checked, engine_io, import_tensorrt, make_logger

log = logging.getLogger(__name__)
ENGINE_SUFFIX = ".plan"
CPU_PARTS = (
    "text_encoder",
    "vae_decoder",
    "vae_encoder",
)  # a MODEL_DIR's parts that get no engine: they run on the CPU


class BuildError(RuntimeError):
    """The engine could not be built; the message carries the ONNX parser's errors and TensorRT's log."""


@dataclass(frozen=True)
class BuildConfig:
    """What to build: `batch` = (min, opt, max) images; the engine's profile doubles opt/max for CFG models."""

    onnx_path: Path
    engine_path: Path | None = None  # default: the ONNX path with suffix .plan
    precision: str = "fp16"
    batch: tuple = (1, 8, 16)
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    hardware_compat: str = "none"
    force: bool = False
    device: int = 0

    def __post_init__(self):
        if self.precision not in mf.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(mf.PRECISIONS)}, got {self.precision!r}")
        if self.hardware_compat not in mf.HARDWARE_COMPAT:
            raise ValueError(
                f"hardware_compat must be one of {', '.join(mf.HARDWARE_COMPAT)}, got {self.hardware_compat!r}"
            )
        batch = tuple(self.batch)
        if (
            len(batch) != 3
            or not all(isinstance(b, int) and b >= 1 for b in batch)
            or not batch[0] <= batch[1] <= batch[2]
        ):
            raise ValueError(f"batch must be MIN:OPT:MAX integers with 1 <= MIN <= OPT <= MAX, got {self.batch!r}")
        if not self.workspace_gb > 0:
            raise ValueError(f"workspace_gb must be > 0, got {self.workspace_gb!r}")

    @property
    def engine(self):
        return (
            Path(self.engine_path) if self.engine_path is not None else Path(self.onnx_path).with_suffix(ENGINE_SUFFIX)
        )


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    manifest_path: Path
    reused: bool  # True when a cached engine with the same key was kept
    manifest: dict
    index_path: Path | None = None  # MODEL.engines.json that records the engine; None when it could not be written
    index_error: str = ""  # why it could not


def parse_batch(text):
    """'MIN:OPT:MAX' (or one 'N' for a static batch) -> (min, opt, max); ValueError names the given text."""
    parts = str(text).split(":")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"batch must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX (or one N), got {text!r}")
    return values


def onnx_precision(proto):
    """'fp16' if the graph holds any float16 tensor (initializer, Cast/Constant, declared value), else 'fp32'."""
    fp16 = onnx.TensorProto.FLOAT16
    graph = proto.graph
    if any(t.data_type == fp16 for t in graph.initializer):
        return "fp16"
    for node in graph.node:
        for attr in node.attribute:
            if (attr.name == "to" and attr.i == fp16) or (
                attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == fp16
            ):
                return "fp16"
    values = [*graph.input, *graph.output, *graph.value_info]
    return "fp16" if any(v.type.tensor_type.elem_type == fp16 for v in values) else "fp32"


def check_precision(proto, precision, path):
    """fp16 needs an fp16 ONNX (no builder flag can cast it under TensorRT 11); fp32 must not contain fp16."""
    found = onnx_precision(proto)
    if found == precision:
        return
    if precision == "fp16":
        raise BuildError(
            f"--precision fp16 needs a float16 ONNX, but {path} is float32; make one with "
            f"`ddengine export --fp16` (TensorRT 11 has no FP16 builder flag)"
        )
    raise BuildError(
        f"--precision fp32 was asked for, but {path} contains float16 tensors; build it with --precision fp16"
    )


def input_shapes(spec, engine_batch, path):
    """{input name: (min, opt, max) shapes} from the model's I/O contract: axis 0 is the batch, the rest static."""
    shapes = {}
    for role in spec.roles():
        tensor = spec.io[role]
        if any(d < 1 for d in tensor.shape[1:]):
            raise BuildError(
                f"{path}: input {tensor.name!r} has shape {list(tensor.shape)}; only axis 0 (batch) may be dynamic"
            )
        if tensor.scalar or tensor.shape[0] >= 1:
            continue  # scalar or static input: no profile entry needed
        shapes[tensor.name] = tuple(tensor.at(rows) for rows in engine_batch)
    return shapes


def network_flags(trt):
    """STRONGLY_TYPED (TensorRT 10.x; deprecated and always on in 11.x, where the flag may be gone)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(config, *, gpu=None, rebuild=None):
    """Build (or reuse) the engine of a U-Net ONNX for `config`; `gpu` = (name, 'major.minor') overrides the CUDA
    device query; `rebuild`: the command recorded for building it again (default: `ddengine build ONNX [-o ENGINE]`)."""
    from ddengine.model.load import load_model

    trt = import_tensorrt()
    model = load_model(config.onnx_path)
    return _build(trt, config, model, gpu, rebuild or rebuild_command(config.onnx_path, config.engine_path, config))


def build_pipeline(folder, engine_dir=None, *, gpu=None, **options):
    """The U-Net engine of a MODEL_DIR as ENGINE_DIR/unet.plan (default: in MODEL_DIR), recorded in
    MODEL_DIR/unet.engines.json; the CPU_PARTS get none. `options`: BuildConfig fields. Returns {"unet": BuildResult}."""
    from ddengine.model.pipeline_spec import PipelineSpec

    spec = PipelineSpec.read(folder)
    engine = Path(engine_dir if engine_dir is not None else folder) / f"unet{ENGINE_SUFFIX}"
    config = BuildConfig(onnx_path=spec.path(folder, "unet"), engine_path=engine, **options)
    return {"unet": build_engine(config, gpu=gpu, rebuild=rebuild_command(folder, engine_dir, config))}


def rebuild_command(model, output, config):
    """The `ddengine build` command line that builds this engine again (absolute paths; no -o for the default)."""
    words = ["ddengine", "build", str(Path(model).resolve())]
    if output is not None:
        words += ["-o", str(Path(output).resolve())]
    words += ["--precision", config.precision, "--batch", ":".join(map(str, config.batch))]
    if config.hardware_compat != "none":
        words += ["--hardware-compat", config.hardware_compat]
    return shlex.join(words)


def device_identity(device):
    """(GPU name, 'major.minor') of CUDA device `device`, made current."""
    from ddengine.gpu.driver import gpu_properties, use_device

    use_device(device)
    return gpu_properties(device)


def _build(trt, config, model, gpu, rebuild):
    """The engine for `config` from the loaded ONNX `model`: reused when its manifest matches the key, else built
    with the model's batch profile, then written (engine, then manifest) atomically; then recorded in the model's
    engine index."""
    from ddengine import __version__
    from ddengine.model.load import read_weightless

    profile = model.spec.batch_profile(config.batch)
    check_precision(read_weightless(config.onnx_path), config.precision, config.onnx_path)
    if gpu is None:
        gpu = device_identity(config.device)
    key = mf.make_key(
        onnx_sha256=model.sha256,
        precision=config.precision,
        profile=profile,
        hardware_compat=config.hardware_compat,
        tensorrt_version=trt.__version__,
        gpu_name=gpu[0],
        compute_capability=gpu[1],
        ddengine_version=__version__,
    )
    engine_path = config.engine
    reused = not config.force and mf.cached_engine_ok(engine_path, key)
    if reused:
        log.info("reusing %s: its manifest matches the cache key", engine_path)
        manifest = mf.read_manifest(engine_path)
    else:
        shapes = input_shapes(model.spec, profile["engine_batch"], config.onnx_path)
        engine_bytes, io = serialize_engine(trt, shapes, config)
        mf.write_atomic(engine_path, engine_bytes)
        source = {"onnx_path": str(Path(config.onnx_path).resolve()), "rebuild": rebuild}
        manifest = mf.write_manifest(
            engine_path, key, mf.sha256_bytes(engine_bytes), spec_json=model.spec.to_json(), io=io, source=source
        )
    index, error = record_engine(config.onnx_path, engine_path)
    return BuildResult(engine_path, mf.manifest_path(engine_path), reused, manifest, index, error)


def record_engine(onnx_path, engine_path):
    """(index path, "") once the engine is first in its model's index, where the tensorrt backend looks; else
    (None, why not): the engine stays built and usable by name."""
    try:
        return mf.record_engine(onnx_path, engine_path), ""
    except OSError as err:  # a read-only model folder, a name too long, ...
        log.warning("could not record %s in %s: %s", engine_path, mf.index_path(onnx_path), err)
        return None, str(err)


def serialize_engine(trt, shapes, config):
    """Parse (from the file, so external data resolves), configure and build; returns (plan bytes, engine I/O)."""
    logger = make_logger(trt)
    builder = checked(trt.Builder(logger), "Builder()", logger)
    network = checked(builder.create_network(network_flags(trt)), "create_network(STRONGLY_TYPED)", logger)
    parser = checked(trt.OnnxParser(network, logger), "OnnxParser()", logger)
    if not parser.parse_from_file(str(config.onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "(no parser error recorded)"
        raise BuildError(f"TensorRT could not parse {config.onnx_path}:\n{errors}\n{logger.text()}")
    builder_config = checked(builder.create_builder_config(), "create_builder_config()", logger)
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gb * (1 << 30)))
    if config.hardware_compat == "ampere+":
        builder_config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    add_profile(trt, builder, builder_config, shapes, logger)
    cache = load_timing_cache(builder_config, config.timing_cache, logger)
    plan = builder.build_serialized_network(network, builder_config)
    if plan is None:
        raise BuildError(f"TensorRT could not build an engine from {config.onnx_path}:\n{logger.text()}")
    engine_bytes = bytes(memoryview(plan))
    if config.timing_cache is not None:
        mf.write_atomic(
            config.timing_cache, bytes(memoryview(checked(cache.serialize(), "ITimingCache.serialize()", logger)))
        )
    return engine_bytes, validate_plan(trt, engine_bytes, logger)


def add_profile(trt, builder, builder_config, shapes, logger):
    """One optimization profile with the (min, opt, max) shape of every dynamic input."""
    profile = checked(builder.create_optimization_profile(), "create_optimization_profile()", logger)
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    if shapes and builder_config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT rejected the optimization profile {shapes}:\n{logger.text()}")


def load_timing_cache(builder_config, path, logger):
    """Start from the timing cache file when it exists (else an empty cache) and attach it to the config."""
    data = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
    cache = checked(builder_config.create_timing_cache(data), f"create_timing_cache({path})", logger)
    checked(builder_config.set_timing_cache(cache, False), "set_timing_cache()", logger)
    return builder_config.get_timing_cache() or cache


def validate_plan(trt, engine_bytes, logger):
    """Deserialize the new plan once (a plan that cannot be loaded is never written) and describe its I/O."""
    runtime = checked(trt.Runtime(logger), "Runtime()", logger)
    engine = checked(runtime.deserialize_cuda_engine(engine_bytes), "deserialize_cuda_engine(new plan)", logger)
    return engine_io(trt, engine)
