"""Load an ONNX model, read its ModelSpec (the `ddengine` metadata entry) and check its inputs against it."""
import hashlib
import importlib.resources
import json
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from onnx import helper

from ddengine.spec import METADATA_KEY, ModelSpec, ModelSpecError

DEFAULT_MODEL = "models/default.onnx"


class ModelError(ValueError):
    """The model file is missing, not a usable ONNX model, or does not match its spec."""


@dataclass(frozen=True)
class Model:
    """A validated model file: where it is, what it is (spec), and its content hash."""

    path: Path
    spec: ModelSpec
    sha256: str


def default_model_path():
    """The shipped default model (package `ddengine`, `models/default.onnx`)."""
    return Path(str(importlib.resources.files("ddengine").joinpath(DEFAULT_MODEL)))


def load_model(path=None, scheduler_config=None):
    """Read and validate `path` (None = the shipped model); `scheduler_config` (a diffusers JSON file) overrides the schedule."""
    path = Path(path) if path is not None else default_model_path()
    data = _read(path)
    proto = _parse(path, data)
    spec = _spec(path, proto, scheduler_config)
    _check_io(path, proto, spec)
    return Model(path=path, spec=spec, sha256=hashlib.sha256(data).hexdigest())


def read_scheduler_config(path):
    """A diffusers scheduler_config.json as a dict, without its private `_class_name`-style keys."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as err:
        raise ModelError(f"cannot read scheduler config {path}: {err.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"scheduler config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ModelError(f"scheduler config {path} must be a JSON object, got {type(config).__name__}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _read(path):
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    data = path.read_bytes()
    if data.startswith(b"version https://git-lfs"):
        raise ModelError(f"model file {path} is a Git LFS pointer, not an ONNX model (run `git lfs pull`)")
    return data


def _parse(path, data):
    try:
        proto = onnx.load_from_string(data)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ModelError(f"model file {path} is not a valid ONNX protobuf: {err}") from None
    if not proto.graph.input or not proto.graph.output:
        raise ModelError(f"model file {path} is not a valid ONNX model: its graph has no inputs or outputs ({len(data)} bytes)")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"model file {path} fails the ONNX checker: {str(err).splitlines()[0]}") from None
    return proto


def _spec(path, proto, scheduler_config):
    meta = {p.key: p.value for p in proto.metadata_props}
    override = read_scheduler_config(scheduler_config) if scheduler_config is not None else None
    if METADATA_KEY in meta:
        try:
            spec = ModelSpec.from_json(meta[METADATA_KEY])
        except ModelSpecError as err:
            raise ModelError(f"model file {path}: {err}") from None
        spec = replace(spec, scheduler=override) if override is not None else spec
    elif override is not None:
        spec = _spec_from_graph(path, proto, override)
    else:
        raise ModelError(f"model file {path} has no '{METADATA_KEY}' metadata entry; "
                         "pass --scheduler-config (a diffusers scheduler_config.json)")
    _check_schedule(path, spec)
    return spec


def _spec_from_graph(path, proto, scheduler):
    """A spec for an ONNX model exported elsewhere: image shape from the `sample` input, unconditional."""
    inputs = {i.name: i for i in proto.graph.input}
    defaults = ModelSpec(scheduler={}, channels=0, height=0, width=0)
    extra = sorted(set(inputs) - {defaults.input_names["sample"], defaults.input_names["timestep"]})
    if extra:
        raise ModelError(f"model file {path} has no '{METADATA_KEY}' metadata and inputs {extra} besides sample/timestep; "
                         "only unconditional models can be described by --scheduler-config alone")
    dims = _dims(path, inputs, defaults.input_names["sample"])
    if len(dims) != 4 or any(d is None for d in dims[1:]):
        raise ModelError(f"model file {path}: input 'sample' must have static shape (N, C, H, W) to be used without metadata, got {dims}")
    t_type = inputs[defaults.input_names["timestep"]].type.tensor_type.elem_type
    output = proto.graph.output[0].name
    return replace(defaults, scheduler=scheduler, channels=dims[1], height=dims[2], width=dims[3],
                   timestep_dtype=str(helper.tensor_dtype_to_np_dtype(t_type)), output_name=output)


def _check_schedule(path, spec):
    try:
        from ddengine.schedule import SchedulerConfig
    except ImportError:  # the schedule module is optional at load time; make_plan checks again
        return
    try:
        SchedulerConfig.from_dict(spec.scheduler)
    except (ValueError, TypeError, KeyError) as err:
        raise ModelError(f"model file {path}: invalid scheduler config: {err}") from None


def _dims(path, inputs, name):
    if name not in inputs:
        raise ModelError(f"model file {path} has no input {name!r}; its inputs are {sorted(inputs)}")
    shape = inputs[name].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in shape]


def _check_io(path, proto, spec):
    """Inputs and output named by the spec exist, with the spec's image shape where the graph fixes it."""
    inputs = {i.name: i for i in proto.graph.input}
    initializers = {t.name for t in proto.graph.initializer}
    wanted = [spec.input_names["sample"], spec.input_names["timestep"]]
    if spec.conditional:
        wanted.append(spec.input_names.get("class_labels", "class_labels"))
    missing = [n for n in wanted if n not in inputs]
    if missing:
        raise ModelError(f"model file {path} lacks input(s) {missing} named by its spec; its inputs are {sorted(inputs)}")
    extra = sorted(set(inputs) - set(wanted) - initializers)
    if extra:
        raise ModelError(f"model file {path} has input(s) {extra} the spec does not name (expected only {wanted})")
    expected = [None, spec.channels, spec.height, spec.width]
    dims = _dims(path, inputs, spec.input_names["sample"])
    if len(dims) != 4 or any(d is not None and d != e for d, e in zip(dims[1:], expected[1:])):
        raise ModelError(f"model file {path}: input {spec.input_names['sample']!r} has shape {dims}, "
                         f"spec expects (N, {spec.channels}, {spec.height}, {spec.width})")
    outputs = [o.name for o in proto.graph.output]
    if spec.output_name not in outputs:
        raise ModelError(f"model file {path} has no output {spec.output_name!r} named by its spec; its outputs are {outputs}")
    if spec.conditional and spec.null_class is not None and not 0 <= spec.null_class <= spec.num_classes:
        raise ModelError(f"model file {path}: null_class {spec.null_class} outside [0, {spec.num_classes}]")
