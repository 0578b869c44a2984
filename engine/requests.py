"""Sampling requests and their one validation: every parameter checked against the model, expected vs given."""
import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np

from ddengine.plan import METHODS
from ddengine.resources import available_memory, human_bytes, usable_cpus
from ddengine.timesteps import SPACINGS, nonempty_list

SEED_LIMIT = 2**64
ARENA_SLACK = 1.5  # ONNX Runtime's arena and fragmentation over the ideal peak (measured: 2.1 vs 1.7 MB/row)
RECORD_BYTES = 1024  # a Python dict record per image kept by Sampler.sample


class InvalidParameterError(ValueError):
    """A sampling parameter is out of range; the message names the expected and the given value."""


@dataclass(frozen=True)
class Request:
    """A validated sampling request: one seed and one class label (or None) per image."""

    steps: int
    method: str
    eta: float
    seeds: np.ndarray  # uint64 (n,)
    classes: np.ndarray | None  # int64 (n,) or None (the model's null class / unconditional)
    guidance: float | None  # the scale used (the model's recommended one when not given); None: no guidance
    batch_size: int
    spacing: str | None
    trajectory: int  # 0 = none, else a snapshot every `trajectory` steps
    prompts: tuple | None = None  # text-to-image models: one prompt per image
    negative_prompts: tuple | None = None  # and the prompt of its unconditional half ("" when none is given)

    @property
    def n(self):
        return len(self.seeds)

    @property
    def plan_key(self):
        return (self.steps, self.method, self.eta, self.spacing)

    def params(self):
        """The request's parameters as a manifest records them (JSON types)."""
        return {"steps": self.steps, "method": self.method, "eta": self.eta, "guidance": self.guidance,
                "spacing": self.spacing}


def make_request(spec, n, steps=50, method="ddim", eta=0.0, seed=0, seeds=None, classes=None, guidance=None,
                 batch_size=16, spacing=None, trajectory=False, *, prompt=None, negative_prompt=None):
    """Check every parameter against the model's spec; raise InvalidParameterError naming expected vs given."""
    num_train = spec.schedule.num_train_timesteps
    n = integer("n", n, 1)
    steps = integer("steps", steps, 1, num_train)
    choice("method", method, METHODS)
    eta = real("eta", eta)
    if method == "ddpm" and eta != 0:
        raise InvalidParameterError(f"eta applies to method 'ddim' only; got eta={eta!r} with method 'ddpm'")
    batch_size = integer("batch_size", batch_size, 1)
    if spacing is not None:
        choice("spacing", spacing, SPACINGS)
    k = 0 if trajectory is False or trajectory is None else integer("trajectory", trajectory, 1)
    labels = parse_classes(spec, n, classes)
    prompts, negatives = parse_prompts(spec, n, prompt, negative_prompt)
    return Request(steps=steps, method=method, eta=eta, seeds=parse_seeds(n, seed, seeds), classes=labels,
                   guidance=parse_guidance(spec, guidance, labels is not None or prompts is not None),
                   batch_size=min(batch_size, n), spacing=spacing, trajectory=k, prompts=prompts, negative_prompts=negatives)


def integer(name, value, low, high=None):
    """An int (numpy integers too) in [low, high]."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}") from None
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidParameterError(f"{name} must be {bound}, got {value}")
    return value


def real(name, value):
    """A finite number >= 0, as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise InvalidParameterError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise InvalidParameterError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def parse_seeds(n, seed, seeds):
    """seeds[i] (default seed + i) as uint64, each in [0, 2**64)."""
    if seeds is None:
        seed = integer("seed", seed, 0, SEED_LIMIT - n)
        return np.arange(n, dtype=np.uint64) + np.uint64(seed)
    if not (isinstance(seed, numbers.Integral) and seed == 0):
        raise InvalidParameterError(f"pass seed or seeds, not both (got seed={seed!r} and seeds)")
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise InvalidParameterError(f"seeds must be a list of n = {n} integers, got {seeds!r}")
    if len(seeds) != n:
        raise InvalidParameterError(f"seeds must have n = {n} entries, got {len(seeds)}")
    return np.array([integer("each seed", s, 0, SEED_LIMIT - 1) for s in seeds], dtype=np.uint64)


def parse_classes(spec, n, classes):
    """None, or one int64 label per image in [0, num_classes): one int, a list cycled over the images, or "all"."""
    if classes is not None and spec.text_conditional:
        raise InvalidParameterError("classes are for class-conditional models; this text-to-image model takes prompt")
    if classes is None:
        if spec.conditional and spec.null_class is None:
            raise InvalidParameterError(f"the model is class-conditional ({spec.num_classes} classes) and has no null class; pass classes")
        return None
    if not spec.conditional:
        raise InvalidParameterError(f"classes={classes!r} given but the model is unconditional (num_classes = 0)")
    if isinstance(classes, str):
        if classes != "all":
            raise InvalidParameterError(f"classes must be an int, a non-empty list of ints or 'all', got {classes!r}")
        classes = range(spec.num_classes)
    elif isinstance(classes, (numbers.Integral, np.integer)) and not isinstance(classes, (bool, np.bool_)):
        classes = [classes]
    given = nonempty_list(classes, "classes", "an int, a non-empty list of ints or 'all'", InvalidParameterError)
    labels = [integer("class", c, 0, spec.num_classes - 1) for c in given]
    return np.array([labels[i % len(labels)] for i in range(n)], dtype=np.int64)


def parse_guidance(spec, guidance, conditioned):
    """The guidance scale: as given, or the model's recommended one when classes or prompts are given and guidance is not."""
    if guidance is None:
        return spec.recommended_guidance if conditioned else None
    guidance = real("guidance", guidance)
    if not spec.guidable:
        raise InvalidParameterError(f"guidance={guidance!r} needs a class-conditional model with a null class or a "
                                    f"text-to-image model; this model has {spec.num_classes} classes and null class {spec.null_class}")
    if not conditioned:
        raise InvalidParameterError(f"guidance={guidance!r} needs {'a prompt' if spec.text_conditional else 'classes'} "
                                    "(it steers towards them)")
    return guidance


MAX_PROMPT_CHARS = 10_000


def parse_prompts(spec, n, prompt, negative_prompt):
    """(prompts, negative prompts) per image for a text-to-image model: a string or a list cycled over the images."""
    if not spec.text_conditional:
        if prompt is not None or negative_prompt is not None:
            raise InvalidParameterError("prompt and negative_prompt need a text-to-image model folder; this model takes "
                                        + ("classes" if spec.conditional else "no conditioning"))
        return None, None
    if prompt is None:
        raise InvalidParameterError("this text-to-image model needs prompt (a string, or a list of strings cycled over the images)")
    prompts = _strings("prompt", prompt, n)
    return prompts, _strings("negative_prompt", "" if negative_prompt is None else negative_prompt, n)


def _strings(name, value, n):
    given = [value] if isinstance(value, str) else value
    if not isinstance(given, (list, tuple)) or not given or not all(isinstance(p, str) for p in given):
        raise InvalidParameterError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    longest = max(len(p) for p in given)
    if longest > MAX_PROMPT_CHARS:
        raise InvalidParameterError(f"{name} must be at most {MAX_PROMPT_CHARS} characters, got one of {longest}")
    return tuple(given[i % len(given)] for i in range(n))


def parse_threads(threads):
    """None (all physical cores) or a thread count in [1, the CPUs this process may use]."""
    return None if threads is None else integer("threads", threads, 1, usable_cpus())


def check_memory(model, request, backend_rows=None, keep_images=False, image_elements=None):
    """Refuse a request whose forward (or, kept in memory, whose images) would not fit; names the estimate.

    image_elements: uint8 values per returned image (default the model's sample size; larger once a VAE decodes it).
    """
    from ddengine.batch import doubles, forward_rows

    spec = model.spec
    rows = forward_rows(request.batch_size, doubles(request.guidance))
    if backend_rows is not None and rows > backend_rows:
        raise InvalidParameterError(f"batch_size {request.batch_size} needs {rows} forward rows; this backend takes at most "
                                    f"{backend_rows} (its engine profile)")
    forward = rows * (ARENA_SLACK * model.activation_bytes_per_row + 3 * 4 * spec.per_image)
    kept = request.n * ((image_elements or spec.per_image) + RECORD_BYTES) if keep_images else 0
    free = available_memory()
    if free is not None and forward + kept > free:
        parts = [f"batch_size {request.batch_size} needs about {human_bytes(forward)} for its forward"]
        if kept:
            parts.append(f"n = {request.n} images kept in memory need {human_bytes(kept)}")
        raise InvalidParameterError(f"{' and '.join(parts)}; this machine has {human_bytes(free)} available "
                                    f"(use a smaller batch_size{', or stream the images' if kept else ''})")
