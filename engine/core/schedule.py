"""Training noise schedules (betas, alphas_cumprod) with diffusers' DDPMScheduler/DDIMScheduler config keys.

Betas are built as diffusers builds them and rounded to float32 (what diffusers stores and what a model is trained
with); alphas and alphas_cumprod are then computed in float64 (diffusers keeps them in float32, which costs it
~3 digits of 1 - alphas_cumprod[t] at small t).
"""

import math
from dataclasses import dataclass, fields

import numpy as np

from ddengine.core.quoting import shown
from ddengine.core.timesteps import SPACINGS as TIMESTEP_SPACINGS

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
UNSUPPORTED_VARIANCE_TYPES = {
    "fixed_large_log": "diffusers takes the square root of log(beta) < 0 and returns NaN",
    "learned": "it needs the model's predicted variance channels",
    "learned_range": "it needs the model's predicted variance channels",
}
# Keys diffusers accepts in a scheduler_config.json that do not change the DDPM/DDIM step without thresholding.
MAX_TRAIN_TIMESTEPS = 100_000  # the schedule is tabulated per timestep (diffusers trains with 1000)
IGNORED_KEYS = ("dynamic_thresholding_ratio", "sample_max_value")
# diffusers scheduler classes whose config describes a discrete DDPM training schedule (betas over T timesteps,
# epsilon/v/sample prediction), which DDPM and DDIM sample exactly: their `_compatibles`. Flow matching, EDM,
# consistency and score-SDE schedulers mean something else by the same keys and are refused.
COMPATIBLE_CLASSES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "DPMSolverSDEScheduler",
)


# diffusers' defaults that differ from DDIMScheduler's, per class: a config of that class that omits a key means these.
CLASS_DEFAULTS: dict[str, dict] = {
    "DPMSolverMultistepScheduler": {"timestep_spacing": "linspace"},
    "UniPCMultistepScheduler": {"timestep_spacing": "linspace"},
    "EulerDiscreteScheduler": {"timestep_spacing": "linspace"},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "linspace"},
    "PNDMScheduler": {"set_alpha_to_one": False, "skip_prk_steps": False},
}


class SchedulerConfigError(ValueError):
    """A scheduler configuration value is invalid or not supported."""


def _choice(name, value, allowed):
    if value not in allowed:
        raise SchedulerConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise SchedulerConfigError(f"{name} must be true or false, got {value!r}")


def _int(name, value, minimum, maximum=None):
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise SchedulerConfigError(f"{name} must be an integer {bound}, got {shown(value)}")


def _real(name, value, low, high):
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not (low <= value <= high):
        raise SchedulerConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")


# What a model was trained with (fixed by its weights) vs. how it is sampled (free to change after training).
TRAINING_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)
SAMPLING_KEYS = (
    "clip_sample",
    "clip_sample_range",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "variance_type",
    "thresholding",
)

# The keys diffusers' solver classes read (engine/core/solvers/classes.py checks their values), and the class name.
SOLVER_KEYS = (
    "_class_name",
    "algorithm_type",
    "solver_order",
    "solver_type",
    "predict_x0",
    "disable_corrector",
    "solver_p",
    "interpolation_type",
    "timestep_type",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "use_lu_lambdas",
    "use_flow_sigmas",
    "use_dynamic_shifting",
    "sigma_min",
    "sigma_max",
    "shift_terminal",
    "lambda_min_clipped",
    "skip_prk_steps",
    "use_karras_sigmas",
    "final_sigmas_type",
    "lower_order_final",
    "euler_at_final",
)


@dataclass(frozen=True)
class SchedulerConfig:
    """diffusers' DDPMScheduler/DDIMScheduler configuration (same keys and defaults), validated on construction."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    variance_type: str = "fixed_small"
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False

    def __post_init__(self):
        _int("num_train_timesteps", self.num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
        _real("beta_start", self.beta_start, 0.0, 1.0)
        _real("beta_end", self.beta_end, 0.0, 1.0)
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _bool("clip_sample", self.clip_sample)
        _real("clip_sample_range", self.clip_sample_range, 0.0, math.inf)
        if not 0 < self.clip_sample_range < math.inf:
            raise SchedulerConfigError(f"clip_sample_range must be a finite number > 0, got {self.clip_sample_range!r}")
        _choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _int("steps_offset", self.steps_offset, 0)
        _bool("set_alpha_to_one", self.set_alpha_to_one)
        if self.variance_type in UNSUPPORTED_VARIANCE_TYPES:
            raise SchedulerConfigError(
                f"variance_type {self.variance_type!r} is not supported ({UNSUPPORTED_VARIANCE_TYPES[self.variance_type]}); "
                f"use one of {', '.join(map(repr, VARIANCE_TYPES))}"
            )
        _choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _bool("rescale_betas_zero_snr", self.rescale_betas_zero_snr)
        _bool("thresholding", self.thresholding)
        if self.thresholding:
            raise SchedulerConfigError(
                "thresholding=True (dynamic thresholding, Saharia et al. 2022) is not supported: it needs a per-sample "
                "quantile of |x0| that the fused step kernel does not compute; use thresholding=false (clip_sample clips x0)"
            )
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", self._checked_trained_betas())
        self.betas()  # validates the schedule as a whole

    def _checked_trained_betas(self):
        try:
            betas = tuple(float(b) for b in self.trained_betas or ())
        except (TypeError, ValueError):
            raise SchedulerConfigError(f"trained_betas must be a list of numbers, got {self.trained_betas!r}") from None
        if len(betas) != self.num_train_timesteps:
            raise SchedulerConfigError(
                f"trained_betas must have num_train_timesteps = {self.num_train_timesteps} entries, got {len(betas)}"
            )
        return betas

    @classmethod
    def from_dict(cls, config):
        """Build from a diffusers scheduler_config.json dict of a compatible class; other keys are ignored (unused_keys)."""
        if not isinstance(config, dict):
            raise SchedulerConfigError(f"scheduler config must be a dict, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name not in COMPATIBLE_CLASSES:
            raise SchedulerConfigError(
                f"scheduler class {name!r} is not supported: its config does not describe a discrete "
                f"DDPM training schedule; expected one of {', '.join(COMPATIBLE_CLASSES)}"
            )
        known = {f.name for f in fields(cls)}
        config = {**CLASS_DEFAULTS.get(str(name), {}), **config}
        if "variance_type" in config and config["variance_type"] is None:  # the multistep classes' "not learned"
            config = {k: v for k, v in config.items() if k != "variance_type"}
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def unused_keys(cls, config):
        """Keys of a scheduler config that DDPM/DDIM sampling does not read (diffusers' from_config ignores them too)."""
        known = {f.name for f in fields(cls)}
        return sorted(
            k
            for k in config
            if k not in known and k not in SOLVER_KEYS and not k.startswith("_") and k not in IGNORED_KEYS
        )

    def to_dict(self):
        """The diffusers scheduler_config keys and values (JSON-serialisable)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["trained_betas"] = None if self.trained_betas is None else list(self.trained_betas)
        return out

    def betas(self):
        """float32 betas[T] as diffusers stores them (cosine/laplace/trained bit-equal, linspace-based within a few ulps).

        The optional zero-terminal-SNR rescale runs in float64 (diffusers runs it in float32, which loses ~3 digits of
        the small betas) and is then rounded to float32.
        """
        betas = _raw_betas(self)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        bad = np.flatnonzero(~(np.isfinite(betas) & (betas > 0) & (betas <= 1)))
        if bad.size:
            i = int(bad[0])
            raise SchedulerConfigError(
                f"betas must lie in (0, 1]; beta[{i}] = {float(betas[i])!r} "
                f"(beta_schedule={self.beta_schedule!r}, beta_start={self.beta_start!r}, beta_end={self.beta_end!r})"
            )
        return betas

    def alphas_cumprod(self):
        """float64 alpha-bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4) from the float32 betas."""
        return np.cumprod(1.0 - self.betas().astype(np.float64))


def _raw_betas(cfg):
    """The schedule before rescaling, float32, as diffusers' __init__ builds it."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, dtype=np.float32)
    if cfg.beta_schedule == "linear":
        return torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    if cfg.beta_schedule == "scaled_linear":
        return torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    if cfg.beta_schedule == "sigmoid":
        x = torch_linspace_f32(-6.0, 6.0, n).astype(np.float64)
        sig = (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
        return sig * np.float32(cfg.beta_end - cfg.beta_start) + np.float32(cfg.beta_start)
    return betas_for_alpha_bar(n, cfg.beta_schedule)


def torch_linspace_f32(start, end, steps):
    """torch.linspace(start, end, steps, dtype=float32) to within a few ulps (torch's vector kernel rounds per CPU)."""
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float32((end - start) / np.float32(steps - 1))
    idx = np.arange(steps)
    lo = start + step * idx.astype(np.float32)
    hi = end - step * (steps - 1 - idx).astype(np.float32)
    return np.where(idx < steps // 2, lo, hi).astype(np.float32)


def betas_for_alpha_bar(n, kind, max_beta=0.999):
    """beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta): GLIDE/iDDPM cosine (Nichol & Dhariwal 2021, eq. 17) or laplace."""

    def cosine(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    def laplace(t):
        lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
        snr = math.exp(lmb)
        return math.sqrt(snr / (1 + snr))

    abar = cosine if kind == "squaredcos_cap_v2" else laplace
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), max_beta) for i in range(n)], dtype=np.float32)


def rescale_zero_terminal_snr(betas):
    """Shift and scale sqrt(alpha-bar) so alpha-bar_{T-1} = 0 (Lin et al. 2023, arXiv 2305.08891, Algorithm 1)."""
    s = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    s0, s_last = s[0], s[-1]
    s = (s - s_last) * (s0 / (s0 - s_last))
    abar = s**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def with_sampling_overrides(trained, overrides):
    """`trained` (a scheduler dict) with the sampling keys of `overrides` replaced; a training key must agree."""
    if not isinstance(overrides, dict):
        raise SchedulerConfigError(f"a scheduler override must be a JSON object, got {type(overrides).__name__}")
    given = {
        k: v for k, v in overrides.items() if (not k.startswith("_") or k in SOLVER_KEYS) and k not in IGNORED_KEYS
    }
    unknown = sorted(k for k in given if k not in TRAINING_KEYS + SAMPLING_KEYS + SOLVER_KEYS)
    if unknown:
        raise SchedulerConfigError(
            f"unknown scheduler keys {', '.join(unknown)}; the sampling keys are {', '.join(SAMPLING_KEYS)} and "
            f"the solver keys {', '.join(SOLVER_KEYS)}"
        )
    base = SchedulerConfig.from_dict(trained).to_dict()
    merged = SchedulerConfig.from_dict({**base, **given}).to_dict()  # normalised: 1000 == 1000.0, lists as lists
    changed = [k for k in TRAINING_KEYS if merged[k] != base[k]]
    if changed:
        raise SchedulerConfigError(
            "the model was trained with "
            + ", ".join(f"{k}={base[k]!r}" for k in changed)
            + f"; an override may change only how it is sampled ({', '.join(SAMPLING_KEYS)}, the solver keys)"
        )
    return {**merged, **{k: v for k, v in {**trained, **given}.items() if k in SOLVER_KEYS}}
