"""Load an ONNX model: its ModelSpec (the `ddengine` metadata entry), bound to the graph's tensors and checked.

The file is never held in memory twice, nor are its weights: the protobuf is read without its large
initializers' bytes (engine/model/onnx_wire.py), the ONNX checker runs on that weightless graph, and the content
hash streams the file (external-data files included).
"""

import hashlib
import importlib.resources
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from onnx import helper

from ddengine.core.schedule import SchedulerConfigError, with_sampling_overrides
from ddengine.files.bounded_json import JSONLimitError, read_bounded_json
from ddengine.model import onnx_wire
from ddengine.model.spec import DYNAMIC, INPUT_ROLES, METADATA_KEY, OUTPUT_ROLE, ModelSpec, ModelSpecError, TensorSpec

DEFAULT_MODEL = "models/default.onnx"
CHUNK = 1 << 20


class ModelError(ValueError):
    """The model file is missing, not a usable ONNX model, or does not match its spec."""


@dataclass(frozen=True)
class Model:
    """A validated model file: where it is, what it is (spec, bound to its graph), and its content hash."""

    path: Path
    spec: ModelSpec
    sha256: str
    graph: onnx.ModelProto = field(repr=False, compare=False)  # weightless (engine/model/onnx_wire.py)


def default_model_path():
    """The shipped default model (package `ddengine`, `models/default.onnx`)."""
    return Path(str(importlib.resources.files("ddengine").joinpath(DEFAULT_MODEL)))


def load_model(path=None, scheduler_config=None):
    """Read and validate `path` (None = the shipped model).

    scheduler_config: a diffusers scheduler_config.json (a path) or its dict. One that states its own training
    schedule (num_train_timesteps and beta_schedule) replaces the model's; a partial one overrides only the sampling
    keys it names, and changing a training key through it is refused by name (core/schedule.py
    with_sampling_overrides).
    """
    path = Path(path) if path is not None else default_model_path()
    _check_file(path)
    override = read_scheduler_config(scheduler_config) if scheduler_config is not None else None
    proto = _parse(path)
    _check_graph(path, proto)
    spec = _spec(path, proto, override)
    try:
        spec = spec.bind(graph_io(proto, spec))
    except ModelSpecError as err:
        raise ModelError(f"model file {path}: {err}") from None
    _check_class_embeddings(path, proto, spec)
    try:
        spec.schedule, spec.solver_options  # noqa: B018  (cached: parsed once, here; the class's method at bind)
    except (SchedulerConfigError, TypeError) as err:
        source = scheduler_config if override is not None else f"model file {path} (its '{METADATA_KEY}' scheduler)"
        raise ModelError(f"{source}: invalid scheduler config: {err}") from None
    return Model(path=path, spec=spec, sha256=onnx_sha256(path, proto), graph=proto)


def read_scheduler_config(path):
    """A diffusers scheduler_config.json (or its dict) as a dict, without its private `_`-prefixed keys but
    `_class_name`."""
    if isinstance(path, dict):
        return _checked_scheduler_config(dict(path), "scheduler config (a dict)")
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"scheduler config {path} is a folder; expected a scheduler_config.json file")
    try:
        config = read_bounded_json(path, f"scheduler config {path}")
    except OSError as err:
        raise ModelError(f"cannot read scheduler config {path}: {err.strerror}") from None
    except JSONLimitError as err:
        raise ModelError(str(err)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"scheduler config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ModelError(f"scheduler config {path} must be a JSON object, got {type(config).__name__}")
    return _checked_scheduler_config(config, f"scheduler config {path}")


def _checked_scheduler_config(config, source):
    from ddengine.core.schedule import SchedulerConfig

    if any(not isinstance(k, str) for k in config):
        raise ModelError(f"{source}: keys must be strings, got {sorted(map(repr, config))[:5]}")
    try:
        SchedulerConfig.from_dict(config)
    except (SchedulerConfigError, TypeError) as err:
        raise ModelError(f"{source}: {err}") from None
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def states_a_schedule(config):
    """Whether a scheduler config states its own training schedule (a whole diffusers config, not an override)."""
    return "num_train_timesteps" in config and "beta_schedule" in config


def _check_file(path):
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise ModelError(f"model file {path} is a Git LFS pointer, not an ONNX model (run `git lfs pull`)")


def _check_graph(path, proto):
    """onnx.checker on the weightless graph: initializers parsed without their data (or kept in external files)
    become graph inputs of their type and shape; external files must be inside the model's folder and exist."""
    detached = {
        t.name
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL or onnx_wire.weightless(t)
    }
    check = proto
    if detached:
        check = onnx.ModelProto()
        check.CopyFrom(proto)
        kept = [t for t in check.graph.initializer if t.name not in detached]
        check.graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, t.dims)
            for t in check.graph.initializer
            if t.name in detached
        )
        del check.graph.initializer[:]
        check.graph.initializer.extend(kept)
    try:
        onnx.checker.check_model(check)
    except onnx.checker.ValidationError as err:
        raise ModelError(f"model file {path} fails the ONNX checker: {str(err).splitlines()[0]}") from None
    except Exception as err:  # protobuf's DecodeError and friends
        raise ModelError(f"model file {path} is not a valid ONNX protobuf: {str(err).splitlines()[0]}") from None
    for file in external_files(proto, path):
        if not file.is_file():
            raise ModelError(f"model file {path}: its external data file {file.name} is missing from {file.parent}")


def read_weightless(path):
    """The ModelProto of an ONNX file without the data of its large initializers (shapes, names, metadata, nodes)."""
    return _parse(Path(path))


def _parse(path):
    """The weightless ModelProto of `path` (engine/model/onnx_wire.py), with a graph that has inputs and outputs."""
    try:
        proto = onnx_wire.read_weightless(path)
    except onnx_wire.WireFormatError as err:
        raise ModelError(f"model file {path}: {err}") from None
    if not proto.graph.input or not proto.graph.output:
        raise ModelError(f"model file {path} is not a valid ONNX model: its graph has no inputs or outputs")
    return proto


def _spec(path, proto, override):
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        if METADATA_KEY in meta:
            spec = ModelSpec.from_json(meta[METADATA_KEY])
            if override is None:
                return spec
            if states_a_schedule(override):
                return replace(spec, scheduler=override)
            try:
                return replace(spec, scheduler=with_sampling_overrides(spec.scheduler, override))
            except SchedulerConfigError as err:
                raise ModelError(f"scheduler config for {path.name}: {err}") from None
        if override is not None:
            return _spec_from_graph(path, proto, override)
    except ModelSpecError as err:
        raise ModelError(f"model file {path}: {err}") from None
    raise ModelError(
        f"model file {path} has no '{METADATA_KEY}' metadata entry; "
        "pass --scheduler-config (a diffusers scheduler_config.json)"
    )


def _spec_from_graph(path, proto, scheduler):
    """A spec for an unconditional ONNX model exported elsewhere: image shape from its `sample` input."""
    inputs, _ = graph_tensors(proto)
    extra = sorted(set(inputs) - {"sample", "timestep"})
    if extra or "sample" not in inputs or "timestep" not in inputs:
        raise ModelError(
            f"model file {path} has no '{METADATA_KEY}' metadata and inputs {sorted(inputs)}; without metadata "
            "only unconditional models with inputs 'sample' and 'timestep' can be described by --scheduler-config"
        )
    dims = inputs["sample"].shape
    if len(dims) != 4 or any(d == DYNAMIC for d in dims[1:]):
        raise ModelError(
            f"model file {path}: input 'sample' must have shape (N, C, H, W) with static C, H, W to be used "
            f"without metadata, got {list(dims)}"
        )
    return ModelSpec(
        scheduler=scheduler,
        channels=dims[1],
        height=dims[2],
        width=dims[3],
        input_names={"sample": "sample", "timestep": "timestep"},
        output_name=proto.graph.output[0].name,
    )


def graph_tensors(proto):
    """({name: TensorSpec} of the graph's inputs that are not initializers, {name: TensorSpec} of its outputs),
    each in graph order."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = {i.name: _tensor(i) for i in proto.graph.input if i.name not in initializers}
    return inputs, {o.name: _tensor(o) for o in proto.graph.output}


def _tensor(value):
    """TensorSpec of a graph input/output (numpy dtype name; DYNAMIC for symbolic or missing dims)."""
    t = value.type.tensor_type
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type).name
    except (KeyError, TypeError):
        dtype = f"onnx type {t.elem_type}"
    dims = tuple(d.dim_value if d.HasField("dim_value") else DYNAMIC for d in t.shape.dim)
    return TensorSpec(name=value.name, dtype=dtype, shape=dims)


def graph_io(proto, spec):
    """role -> TensorSpec for the spec's inputs and output; other graph inputs (not initializers) are refused."""
    inputs, outputs = graph_tensors(proto)
    named = {spec.input_names[r]: r for r in spec.roles()}
    extra = sorted(set(inputs) - set(named))
    if extra:
        raise ModelSpecError(f"the graph has input(s) {extra} the spec does not name (it names {sorted(named)})")
    io = {role: inputs[name] for name, role in named.items() if name in inputs}
    if spec.output_name in outputs:
        io[OUTPUT_ROLE] = outputs[spec.output_name]
    else:
        raise ModelSpecError(
            f"the graph has no output {spec.output_name!r} named by its spec; its outputs are {sorted(outputs)}"
        )
    return {r: io[r] for r in (*INPUT_ROLES, OUTPUT_ROLE) if r in io}


def _check_class_embeddings(path, proto, spec):
    """A Gather of an embedding table by class_labels must have a row for every class id the spec allows."""
    if not spec.conditional:
        return
    ids = {spec.io["class_labels"].name}
    for node in proto.graph.node:  # follow Casts of the labels
        if node.op_type == "Cast" and node.input and node.input[0] in ids:
            ids.update(node.output)
    tables = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in ids and node.input[0] in tables:
            rows = tables[node.input[0]].dims[0]
            needed = max(spec.num_classes, (spec.null_class if spec.null_class is not None else -1) + 1)
            if rows < needed:
                raise ModelError(
                    f"model file {path}: its class embedding {node.input[0]!r} has {rows} rows, but the spec "
                    f"allows class ids up to {needed - 1} ({spec.num_classes} classes, null class {spec.null_class})"
                )


def external_files(proto, path):
    """The external-data files an ONNX model names, each checked to stay inside the model's folder."""
    folder = Path(path).resolve().parent
    names = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    files = []
    for name in sorted(names):
        target = (folder / name).resolve()
        if Path(name).is_absolute() or folder not in target.parents:
            raise ModelError(
                f"model file {path}: external data location {name!r} points outside the model's folder {folder}"
            )
        files.append(target)
    return files


def onnx_sha256(path, proto=None):
    """Content hash of a model: sha256 of the file, extended by its external-data files (names and bytes) if any."""
    proto = _parse(Path(path)) if proto is None else proto
    digest = hashlib.sha256()
    _update(digest, path)
    extra = external_files(proto, path)
    if not extra:
        return digest.hexdigest()
    for file in extra:
        digest.update(b"\0" + file.name.encode() + b"\0")
        _update(digest, file)
    return digest.hexdigest()


def _update(digest, path):
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
