"""SamplingParams, the one request schema, and its one validation: expected vs given, then bound to a model.

The Python API (Sampler.sample/stream/request), the CLI (`ddengine sample`) and the HTTP body (POST /v1/images,
and its /openapi.json schema) all build a SamplingParams. Its own checks need no model; `bind(spec)` checks it
against one and gives the Request the loops run.
"""

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator

from ddengine.core.plan import METHODS, Method
from ddengine.core.quoting import shown
from ddengine.core.schedule import SchedulerConfigError
from ddengine.core.timesteps import SPACINGS, Spacing, nonempty_list
from ddengine.runtime.init_state import InitError, InitState, bind_init, start_step
from ddengine.runtime.per_image import PerImage, cycled, seed_range

SEED_LIMIT = 2**64
MAX_IMAGES = 10_000_000  # per request (its seeds and labels are made per chunk; the bound keeps seed + i in 64 bits)
UNORDERED = (dict, set, frozenset)  # no order to give image i its seed or class
MAX_PROMPT_CHARS = 10_000
CLASSES_EXPECTED = "an int, a non-empty list of ints or 'all'"
IMAGE_SCHEMA = {
    "anyOf": [
        {"type": "string", "contentEncoding": "base64"},
        {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
    ]
}
DEFAULT_STEPS = 50
DEFAULT_METHOD = "ddim"


class InvalidParameterError(ValueError):
    """A sampling parameter is out of range; the message names the expected and the given value."""


class SamplingParams(BaseModel):
    """What to sample, independent of any model: `SamplingParams.build(n=4, steps=20, classes=[1, 2])`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    n: int = Field(1, ge=1, le=MAX_IMAGES, description=f"Number of images (at most {MAX_IMAGES:,}).")
    steps: int | None = Field(
        None,
        ge=1,
        description=f"Sampling steps, 1 .. the model's num_train_timesteps (default: the model's recommended steps "
        f"when method is not given either, else {DEFAULT_STEPS}).",
    )
    method: Method | None = Field(
        None,
        description="The sampler (default: the model's recommended method when steps is not given either, else "
        f"{DEFAULT_METHOD}): ddim (Song et al. 2021), ddpm (Ho et al. 2020), dpmpp-2m / dpmpp-3m (DPM-Solver++, Lu et al. 2022), "
        "unipc (Zhao et al. 2023), euler / euler-a (Karras et al. 2022) or plms (Liu et al. 2022), as diffusers' "
        "schedulers of the same names.",
    )
    eta: float = Field(0.0, ge=0, description="DDIM eta: 0 is deterministic, 1 is DDPM-like noise (method ddim only).")
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="Image i uses seed + i.")
    seeds: list[int] | None = Field(None, description="One seed per image, instead of seed.")
    classes: int | list[int] | Literal["all"] | None = Field(
        None, description="Class-conditional models: a class, a list cycled over the images, or 'all'."
    )
    guidance: float | None = Field(
        None,
        ge=0,
        description="Classifier-free guidance scale (default: the model's "
        "recommended one when classes or a prompt are given; 1 = none, 0 = unconditional).",
    )
    spacing: Spacing | None = Field(None, description="Timestep spacing (default: the model's).")
    prompt: str | list[str] | None = Field(
        None, description="Text-to-image models: a prompt, or a list cycled over the images."
    )
    negative_prompt: str | list[str] | None = Field(
        None, description='The prompt guidance steers away from (default: none, "").'
    )
    image: Annotated[Any, WithJsonSchema(IMAGE_SCHEMA)] = Field(
        None,
        description="Image-to-image: the image(s) to start from, at the model's size (JSON: base64 PNG/JPEG; Python: "
        "uint8 HxWxC arrays or PIL images), one for all or one per image.",
    )
    strength: float | None = Field(
        None, description="Image-to-image: how much of the schedule runs, in (0, 1] (default 0.8, as diffusers)."
    )
    mask: Annotated[Any, WithJsonSchema(IMAGE_SCHEMA)] = Field(
        None,
        description="Inpainting, with image: white (>= 50%) pixels are repainted, black ones kept (diffusers' "
        "mask_image); one for all or one per image. strength defaults to 1 with a mask.",
    )
    latents: Annotated[Any, WithJsonSchema({"type": "array", "description": "(n, C, H, W) numbers"})] = Field(
        None, description="The initial noise, (n, C, H, W) (diffusers' latents=): instead of the seeds' normals."
    )

    def __init__(self, **fields):
        """As pydantic's, but every problem is one InvalidParameterError (expected vs given), as everywhere else."""
        try:
            super().__init__(**fields)
        except ValidationError as err:
            raise InvalidParameterError(describe(err)) from None

    @classmethod
    def build(cls, **fields):
        """SamplingParams(**fields), every problem raised as one InvalidParameterError (expected vs given)."""
        return cls.parse(fields)

    @classmethod
    def given(cls, first=None, **fields):
        """What a call like `sample(8, steps=20)` asks for: `first` is a SamplingParams (then no fields) or n."""
        if isinstance(first, SamplingParams):
            if fields:
                raise InvalidParameterError(f"pass a SamplingParams or its fields, not both (got {', '.join(fields)})")
            return first
        if first is not None:
            if "n" in fields:
                raise InvalidParameterError(f"n given twice: {first!r} and n={fields['n']!r}")
            fields["n"] = first
        return cls.parse(fields)

    @classmethod
    def parse(cls, data):
        """SamplingParams of a dict (a JSON body), every problem raised as one InvalidParameterError."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise InvalidParameterError(describe(err)) from None

    @field_validator("n", "steps", mode="before")
    @classmethod
    def _count(cls, value, info):
        if value is None and info.field_name == "steps":
            return None
        return integer(info.field_name, value, 1, MAX_IMAGES if info.field_name == "n" else None)

    @field_validator("seed", mode="before")
    @classmethod
    def _seed(cls, value):
        return integer("seed", value, 0, SEED_LIMIT - 1)

    @field_validator("eta", "guidance", mode="before")
    @classmethod
    def _real(cls, value, info):
        return None if value is None and info.field_name == "guidance" else real(info.field_name, value)

    @field_validator("strength", mode="before")
    @classmethod
    def _strength(cls, value):
        if value is not None and not 0 < real("strength", value) <= 1:
            raise InvalidParameterError(f"strength must be in (0, 1], got {shown(value)}")
        return value

    @field_validator("method", "spacing", mode="before")
    @classmethod
    def _choice(cls, value, info):
        allowed = METHODS if info.field_name == "method" else SPACINGS
        if value is None:
            return None
        if not isinstance(value, str) or value not in allowed:
            raise InvalidParameterError(
                f"{info.field_name} must be one of {', '.join(map(repr, allowed))}, got {shown(value)}"
            )
        return value

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, value):
        if value is None:
            return None
        if isinstance(value, (str, bytes, *UNORDERED)) or not hasattr(value, "__len__"):
            raise InvalidParameterError(f"seeds must be a list of n integers (one per image), got {shown(value)}")
        return [integer("each seed", s, 0, SEED_LIMIT - 1) for s in value]

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, value):
        if value is None or (isinstance(value, str) and value == "all"):
            return value
        if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        if isinstance(value, (str, bytes, numbers.Number, bool, np.bool_, *UNORDERED)):
            raise InvalidParameterError(f"classes must be {CLASSES_EXPECTED}, got {shown(value)}")
        given = nonempty_list(value, "classes", CLASSES_EXPECTED, InvalidParameterError)
        return [integer("class", c, -(2**63)) for c in given]  # the model bounds them (bind)

    @field_validator("prompt", "negative_prompt", mode="before")
    @classmethod
    def _prompts(cls, value, info):
        if value is None:
            return None
        given = [value] if isinstance(value, str) else value
        if not isinstance(given, (list, tuple)) or not given or not all(isinstance(p, str) for p in given):
            raise InvalidParameterError(
                f"{info.field_name} must be a string or a non-empty list of strings, got {shown(value)}"
            )
        longest = max(len(p) for p in given)
        if longest > MAX_PROMPT_CHARS:
            raise InvalidParameterError(
                f"{info.field_name} must be at most {MAX_PROMPT_CHARS} characters, got one of {longest}"
            )
        for prompt in given:
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:  # a lone surrogate, e.g. from bytes decoded under a C locale
                raise InvalidParameterError(
                    f"{info.field_name} must be valid Unicode text; {shown(prompt)} has a lone surrogate at "
                    f"character {err.start}"
                ) from None
        return value if isinstance(value, str) else list(value)

    @model_validator(mode="after")
    def _together(self):
        if self.method not in (None, "ddim") and self.eta != 0:
            raise InvalidParameterError(
                f"eta applies to method 'ddim' only; got eta={self.eta!r} with method {self.method!r}"
            )
        if self.seeds is None:
            integer("seed", self.seed, 0, SEED_LIMIT - self.n)  # seed + i stays a 64-bit seed (n <= MAX_IMAGES)
        elif self.seed != 0:
            raise InvalidParameterError(f"pass seed or seeds, not both (got seed={self.seed!r} and seeds)")
        elif len(self.seeds) != self.n:
            raise InvalidParameterError(f"seeds must have n = {self.n} entries, got {len(self.seeds)}")
        return self

    def bind(self, spec, batch_size=16, trajectory=False):
        """The Request this asks of a model (its ModelSpec); batch_size and trajectory say how to run it."""
        steps, method = bind_schedule(spec, self.steps, self.method, self.eta)
        steps = integer("steps", steps, 1, spec.schedule.num_train_timesteps)
        batch_size = integer("batch_size", batch_size, 1)
        k = 0 if trajectory is False or trajectory is None else integer("trajectory", trajectory, 1)
        labels = bind_classes(spec, self.n, self.classes)
        prompts, negatives = bind_prompts(spec, self.n, self.prompt, self.negative_prompt)
        guidance = bind_guidance(spec, self.guidance, labels is not None or prompts is not None)
        seeds = seed_range(self.seed, self.n) if self.seeds is None else cycled(self.seeds, self.n, np.uint64)
        try:
            init = bind_init(spec, self.n, self.image, self.strength, self.latents, self.mask)
        except InitError as err:
            raise InvalidParameterError(str(err)) from None
        if init is not None and init.strength is not None and start_step(steps, init.strength) >= steps:
            raise InvalidParameterError(
                f"strength {init.strength} runs none of the {steps} steps (int(steps * strength) = 0); "
                f"use strength >= {1 / steps:.3g} or more steps"
            )
        return Request(
            steps=steps,
            method=method,
            eta=float(self.eta),
            seeds=seeds,
            classes=labels,
            guidance=guidance,
            batch_size=min(batch_size, self.n),
            spacing=self.spacing,
            trajectory=k,
            prompts=prompts,
            negative_prompts=negatives,
            init=init,
        )


@dataclass(frozen=True)
class Request:
    """SamplingParams bound to a model: one seed and one class label (or None) per image, the guidance used."""

    steps: int
    method: str
    eta: float
    seeds: PerImage  # uint64 per image, made per chunk (engine/runtime/per_image.py)
    classes: PerImage | None  # int64 per image, or None (the model's null class / unconditional)
    guidance: float | None  # the scale used (the model's recommended one when not given); None: no guidance
    batch_size: int
    spacing: str | None
    trajectory: int  # 0 = none, else a snapshot every `trajectory` steps
    prompts: PerImage | None = None  # text-to-image models: one prompt per image
    negative_prompts: PerImage | None = None  # and the prompt of its unconditional half ("" when none is given)
    init: InitState | None = None  # an image and/or the caller's noise to start from (None: the seeds' noise)

    @property
    def n(self):
        return len(self.seeds)

    @property
    def start(self):
        """The first step index that runs: 0, or the image-to-image strength's (diffusers' get_timesteps)."""
        strength = None if self.init is None else self.init.strength
        return 0 if strength is None else start_step(self.steps, strength)

    @property
    def plan_key(self):
        return (self.steps, self.method, self.eta, self.spacing, self.start)

    def params(self):
        """The request's parameters as a manifest records them (JSON types)."""
        started = {} if self.init is None else self.init.record()
        return {
            "steps": self.steps,
            "method": self.method,
            "eta": self.eta,
            "guidance": self.guidance,
            "spacing": self.spacing,
            **started,
        }


def describe(err):
    """A pydantic ValidationError as our sentences, one per field: "n must be an integer, got true"."""
    parts = {}
    for error in err.errors():
        loc = [str(p) for p in error["loc"] if p != "body"]
        name = loc[0] if loc else "body"
        if error["type"] == "extra_forbidden":
            parts[name] = f"unknown field {name!r} (expected some of: {', '.join(SamplingParams.model_fields)})"
        elif isinstance(error.get("ctx", {}).get("error"), InvalidParameterError):
            parts[name] = str(error["ctx"]["error"])
        else:
            parts.setdefault(name, f"{'.'.join(loc) or 'body'}: {error['msg']}")
    return "; ".join(parts.values())


def integer(name, value, low, high=None):
    """An int (numpy integers too, never a bool) in [low, high]."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise InvalidParameterError(f"{name} must be an integer, got {shown(value)}") from None
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidParameterError(f"{name} must be {bound}, got {shown(value)}")
    return value


def real(name, value):
    """A finite number >= 0, as a float."""
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidParameterError(f"{name} must be a finite number >= 0, got {shown(value)}")
    return float(value)


def bind_classes(spec, n, classes):
    """None, or one int64 label per image in [0, num_classes): one int, a list cycled over the images, or "all"."""
    if classes is not None and spec.text_conditional:
        raise InvalidParameterError(
            f"classes={shown(classes)} given, but this text-to-image model takes prompt, not classes"
        )
    if classes is None:
        if spec.conditional and spec.null_class is None:
            raise InvalidParameterError(
                f"the model is class-conditional ({spec.num_classes} classes) and has no null class; pass classes"
            )
        return None
    if not spec.conditional:
        raise InvalidParameterError(f"classes={shown(classes)} given but the model is unconditional (num_classes = 0)")
    given = range(spec.num_classes) if classes == "all" else [classes] if isinstance(classes, int) else classes
    return cycled([integer("class", c, 0, spec.num_classes - 1) for c in given], n, np.int64)


def bind_schedule(spec, steps, method, eta=0.0):
    """(steps, method): the method as given, else the scheduler config's class's, else (with neither steps nor eta
    given) the model's recommended pair, else ddim; steps as given, else 50."""
    if method is None and scheduler_method(spec) is not None:
        method = scheduler_method(spec)
        if eta:
            raise InvalidParameterError(
                f"eta applies to method 'ddim' only; got eta={eta!r} and the scheduler config's "
                f"{spec.scheduler['_class_name']} (method {method!r}); pass method='ddim' to use eta"
            )
    elif method is None and steps is None and not eta and spec.recommended_method is not None:
        return spec.recommended_steps, spec.recommended_method
    return (DEFAULT_STEPS if steps is None else steps), (method or DEFAULT_METHOD)


def scheduler_method(spec):
    """The method the model's scheduler config selects, or None; a class the engine lacks is refused by name."""
    try:
        return spec.scheduler_method
    except SchedulerConfigError as err:
        raise InvalidParameterError(
            f"{err} (the model's scheduler config; a method given explicitly overrides it)"
        ) from None


def bind_guidance(spec, guidance, conditioned):
    """The guidance scale: as given, or the model's recommended one when classes or prompts are given and guidance is not."""
    if guidance is None:
        return spec.recommended_guidance if conditioned else None
    if not spec.guidable:
        raise InvalidParameterError(
            f"guidance={shown(guidance)} needs a class-conditional model with a null class or a "
            f"text-to-image model; this model has {spec.num_classes} classes and null class "
            f"{spec.null_class}"
        )
    if not conditioned:
        raise InvalidParameterError(
            f"guidance={shown(guidance)} needs {'a prompt' if spec.text_conditional else 'classes'} (it steers towards them)"
        )
    return guidance


def bind_prompts(spec, n, prompt, negative_prompt):
    """(prompts, negative prompts) per image for a text-to-image model, each cycled over the images."""
    if not spec.text_conditional:
        if prompt is not None or negative_prompt is not None:
            takes = f"{spec.num_classes} classes: give classes" if spec.conditional else "no conditioning"
            raise InvalidParameterError(
                "prompt and negative_prompt need a text-to-image MODEL_DIR (`ddengine export "
                f"--diffusers`); this model takes {takes}"
            )
        return None, None
    if prompt is None:
        raise InvalidParameterError(
            "this text-to-image model needs prompt (a string, or a list of strings cycled over the images)"
        )
    negative = "" if negative_prompt is None else negative_prompt
    return cycled([prompt] if isinstance(prompt, str) else prompt, n), cycled(
        [negative] if isinstance(negative, str) else negative, n
    )
