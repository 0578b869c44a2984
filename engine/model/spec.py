"""ModelSpec: what a self-describing ONNX model tells the engine, and the one I/O contract every part reads.

The `ddengine` metadata entry (JSON) names the model's tensors by role, its image shape and value range, its
classes and null class, and its training schedule; `ModelSpec.bind` adds the graph's own dtypes and shapes.
The exporter writes it, the TensorRT builder sizes its profile from it, and every backend binds by it
(the TensorRT demo's one per-model I/O declaration).
"""

import json
import math
import numbers
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

from ddengine.core.quoting import shown
from ddengine.files.bounded_json import JSONLimitError, parse_bounded_json

METADATA_KEY = "ddengine"
MAX_CLASS_NAME = 100
FORMAT_VERSION = 1
# Input roles a U-Net may have; "out" is the output. sample and out are (N, C, H, W); the others are per row.
INPUT_ROLES = ("sample", "timestep", "class_labels", "encoder_hidden_states")
OUTPUT_ROLE = "out"
REQUIRED_ROLES = ("sample", "timestep")
ROLE_DTYPES = {
    "sample": ("float32", "float16"),
    "timestep": ("int64", "int32", "float32", "float16"),
    "class_labels": ("int64", "int32"),
    "encoder_hidden_states": ("float32", "float16"),
    "out": ("float32", "float16"),
}
DYNAMIC = -1  # a dimension the graph leaves open (the batch axis)


class ModelSpecError(ValueError):
    """The model's metadata is missing, malformed, of an unsupported version, or does not match its graph."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph tensor: its name, numpy dtype name and shape (DYNAMIC for open dimensions)."""

    name: str
    dtype: str
    shape: tuple

    def at(self, rows):
        """The concrete shape for `rows` rows (the dynamic batch axis set)."""
        return tuple(rows if i == 0 and d == DYNAMIC else d for i, d in enumerate(self.shape))

    @property
    def scalar(self):
        return self.shape == ()


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to sample a model; serialised as JSON under the ONNX metadata key `ddengine`.

    `scheduler` uses diffusers' scheduler_config.json keys (engine/core/schedule.py SchedulerConfig).
    `io` (role -> TensorSpec) is not stored: `bind` reads it from the graph when the model loads.
    """

    scheduler: dict
    channels: int
    height: int
    width: int
    value_range: tuple = (-1.0, 1.0)
    num_classes: int = 0  # 0 = unconditional
    null_class: int | None = None  # the class id meaning "no class" (classifier-free guidance)
    input_names: dict = field(
        default_factory=lambda: {"sample": "sample", "timestep": "timestep", "class_labels": "class_labels"}
    )
    output_name: str = "out"
    recommended_guidance: float | None = None  # used when classes are given and guidance is not
    recommended_method: str | None = None  # with recommended_steps: used when a request gives neither
    recommended_steps: int | None = None
    class_names: tuple | None = None  # one name per class (the OpenAI endpoint's prompt for class models)
    format_version: int = FORMAT_VERSION
    io: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_fields(self)

    @property
    def conditional(self):
        return self.num_classes > 0

    @property
    def text_conditional(self):
        """A latent text-to-image U-Net: conditioned on prompt embeddings (encoder_hidden_states)."""
        return "encoder_hidden_states" in self.input_names

    @property
    def guidable(self):
        """Classifier-free guidance needs an unconditional branch: a null class, or a negative/empty prompt."""
        return (self.conditional and self.null_class is not None) or self.text_conditional

    @property
    def cfg_factor(self):
        """Forward rows per image at most: 2 under classifier-free guidance ([conditional; unconditional])."""
        return 2 if self.guidable else 1

    @cached_property
    def schedule(self):
        """The scheduler config, parsed and validated once (engine/core/schedule.py)."""
        from ddengine.core.schedule import SchedulerConfig

        return SchedulerConfig.from_dict(self.scheduler)

    @cached_property
    def scheduler_method(self):
        """The method the scheduler config's `_class_name` selects; None: DDPM/DDIM or no class (the request's)."""
        from ddengine.core.solvers.classes import class_method

        return class_method(self.scheduler)

    @cached_property
    def solver_options(self):
        """The solver keys of the scheduler config (use_karras_sigmas, final_sigmas_type, ...) as SolverOptions."""
        from ddengine.core.solvers.classes import solver_options

        return solver_options(self.scheduler)

    @property
    def image_shape(self):
        return (self.channels, self.height, self.width)

    @property
    def per_image(self):
        return self.channels * self.height * self.width

    def roles(self):
        """The input roles this model takes, in INPUT_ROLES order."""
        return [r for r in INPUT_ROLES if r in self.input_names and (r != "class_labels" or self.conditional)]

    def batch_profile(self, batch):
        """TensorRT profile: images (min, opt, max) and model rows, opt/max times cfg_factor for guided batches."""
        lo, opt, hi = (int(b) for b in batch)
        return {"batch": [lo, opt, hi], "engine_batch": [lo, opt * self.cfg_factor, hi * self.cfg_factor]}

    def bind(self, io):
        """This spec with the graph's tensors (role -> TensorSpec), checked against the roles and image shape."""
        check_io(self, io)
        return replace(self, io=dict(io))

    def to_json(self):
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "io"}
        return json.dumps(json.loads(json.dumps(data, default=list)), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Parse the metadata entry, naming what is wrong when it cannot be used."""
        try:
            data = parse_bounded_json(text, f"'{METADATA_KEY}' metadata")
        except JSONLimitError as err:
            raise ModelSpecError(str(err)) from None
        except json.JSONDecodeError as err:
            raise ModelSpecError(f"'{METADATA_KEY}' metadata is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ModelSpecError(f"'{METADATA_KEY}' metadata must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelSpecError(
                f"'{METADATA_KEY}' metadata format_version {shown(version)} is not supported (expected {FORMAT_VERSION})"
            )
        missing = [k for k in ("scheduler", "channels", "height", "width") if k not in data]
        if missing:
            raise ModelSpecError(f"'{METADATA_KEY}' metadata lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)} - {"io"}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("value_range", "class_names"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)


def _int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ModelSpecError(f"'{METADATA_KEY}' metadata {name} must be an integer >= {low}, got {shown(value)}")


def _number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(spec):
    """Every metadata field in range: shapes, value range, classes, null class, names, recommended guidance."""
    if not isinstance(spec.scheduler, dict):
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata scheduler must be a JSON object, got {type(spec.scheduler).__name__}"
        )
    for name in ("channels", "height", "width"):
        _int(name, getattr(spec, name), 1)
    _int("num_classes", spec.num_classes, 0)
    vr = spec.value_range
    if not (isinstance(vr, (tuple, list)) and len(vr) == 2 and all(_number(v) for v in vr) and vr[0] < vr[1]):
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata value_range must be two finite numbers [lo, hi] with lo < hi, got {shown(vr)}"
        )
    if spec.null_class is not None:
        _int("null_class", spec.null_class, 0)
        if not spec.conditional or spec.null_class > spec.num_classes:
            raise ModelSpecError(
                f"'{METADATA_KEY}' metadata null_class {spec.null_class} needs a conditional model with "
                f"0 <= null_class <= num_classes = {spec.num_classes}"
            )
    names = spec.input_names
    if not isinstance(names, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in names.items()
    ):
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata input_names must map roles to tensor names, got {shown(names)}"
        )
    unknown = sorted(set(names) - set(INPUT_ROLES))
    needed = [*REQUIRED_ROLES, *(["class_labels"] if spec.conditional else [])]
    missing = [r for r in needed if r not in names]
    if unknown or missing:
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata input_names must name roles {needed} (optional: "
            f"encoder_hidden_states); missing {missing}, unknown {unknown}"
        )
    if not isinstance(spec.output_name, str) or not spec.output_name:
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata output_name must be a tensor name, got {shown(spec.output_name)}"
        )
    g = spec.recommended_guidance
    if g is not None and not (_number(g) and g >= 0 and spec.guidable):
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata recommended_guidance must be null or a finite number >= 0 on a "
            f"model with a null class or text conditioning, got {shown(g)}"
        )
    _check_recommended_schedule(spec)
    _check_class_names(spec)


def _check_recommended_schedule(spec):
    """recommended_method and recommended_steps: both null, or a METHODS name and steps >= 1 (bind bounds them by T)."""
    from ddengine.core.plan import METHODS

    method, steps = spec.recommended_method, spec.recommended_steps
    if method is None and steps is None:
        return
    if method not in METHODS or isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata recommended_method and recommended_steps must be both null, or one of "
            f"{', '.join(METHODS)} and an integer >= 1; got {shown(method)} and {shown(steps)}"
        )


def _check_class_names(spec):
    """class_names: null, or num_classes distinct non-empty names (matched case-insensitively)."""
    names = spec.class_names
    if names is None:
        return
    if (
        not isinstance(names, (tuple, list))
        or len(names) != spec.num_classes
        or not all(isinstance(n, str) and n.strip() and len(n) <= MAX_CLASS_NAME for n in names)
        or len({n.strip().casefold() for n in names}) != len(names)
    ):
        raise ModelSpecError(
            f"'{METADATA_KEY}' metadata class_names must be null or {spec.num_classes} distinct non-empty names "
            f"(at most {MAX_CLASS_NAME} characters, case-insensitively distinct), got {shown(names)}"
        )


def check_io(spec, io):
    """The graph's tensors fit the roles: dtypes, a batch axis, the sample/out image shape, per-row inputs."""
    wanted = {**{r: spec.input_names[r] for r in spec.roles()}, OUTPUT_ROLE: spec.output_name}
    for role, name in wanted.items():
        if role not in io:
            raise ModelSpecError(
                f"the graph has no {'output' if role == OUTPUT_ROLE else 'input'} {shown(name)} ({role}) named by its spec"
            )
        tensor = io[role]
        if tensor.dtype not in ROLE_DTYPES[role]:
            raise ModelSpecError(
                f"tensor {shown(name)} ({role}) is {tensor.dtype}; expected one of {', '.join(ROLE_DTYPES[role])}"
            )
        if role in ("sample", OUTPUT_ROLE):
            dims = tensor.shape
            if len(dims) != 4 or any(d not in (DYNAMIC, e) for d, e in zip(dims[1:], spec.image_shape)):
                raise ModelSpecError(
                    f"tensor {shown(name)} ({role}) has shape {show_shape(dims)}; the spec's image is "
                    f"(N, {spec.channels}, {spec.height}, {spec.width})"
                )
            if dims[0] != DYNAMIC:
                raise ModelSpecError(
                    f"tensor {shown(name)} ({role}) has a fixed batch of {dims[0]}; export it with a dynamic batch axis"
                )
        elif not (tensor.scalar and role == "timestep") and (not tensor.shape or tensor.shape[0] != DYNAMIC):
            raise ModelSpecError(
                f"input {shown(name)} ({role}) has shape {show_shape(tensor.shape)}; expected a dynamic batch axis first"
                + (" (or a scalar)" if role == "timestep" else "")
            )


def show_shape(dims):
    """A shape as messages write it: (N, 4, 64, 64), N for a dynamic axis."""
    return "(" + ", ".join("N" if d == DYNAMIC else str(d) for d in dims) + ("," if len(dims) == 1 else "") + ")"
