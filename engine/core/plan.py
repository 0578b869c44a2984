"""StepPlan: one float64 coefficient row (engine/core/rows.py) per sampler step, reproducing a diffusers scheduler's
`step()`: DDPM and DDIM here, the multistep and sigma-space solvers in engine/core/solvers/."""

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

import numpy as np

from ddengine.core.rows import AM, AX, B0, BM, BX, CLIP, NUM_COLUMNS, P0, PE, PX, SIGMA, blank_row, is_multistep
from ddengine.core.schedule import SchedulerConfig
from ddengine.core.solvers import SOLVERS, SolverOptions, noise_levels
from ddengine.core.timesteps import check_steps, check_timesteps, inference_timesteps

Method = Literal["ddim", "ddpm", "dpmpp-2m", "dpmpp-3m", "unipc", "euler", "euler-a", "plms"]
METHODS = get_args(Method)


@dataclass(frozen=True, eq=False)
class StepPlan:
    """The sampling schedule: model timesteps (int64, or float64 where fractional) and coefficient rows float64[n, 25]
    (read-only); x_T = init_scale * the seed's normals, or an image noised to levels[0] (image-to-image)."""

    timesteps: np.ndarray
    coeffs: np.ndarray
    clip: float | None
    method: str
    eta: float
    init_scale: float = 1.0
    levels: tuple = ()  # alphas_cumprod before each row and 1.0 after the last: an image noised to the step's level

    def __post_init__(self):
        ts = np.asarray(self.timesteps)
        integral = bool(np.all(np.mod(ts, 1) == 0)) if ts.dtype.kind == "f" else True
        for name, dtype in (("timesteps", np.int64 if integral else np.float64), ("coeffs", np.float64)):
            arr = np.array(getattr(self, name), dtype=dtype)
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        n = len(self.timesteps)
        if self.timesteps.shape != (n,) or self.coeffs.shape != (n, NUM_COLUMNS):
            raise ValueError(f"coeffs must have shape ({n}, {NUM_COLUMNS}) for {n} timesteps, got {self.coeffs.shape}")

    def __len__(self):
        return len(self.timesteps)

    @property
    def start_abar(self):
        """The noise level an image starts at (image-to-image): levels[0]."""
        return self.levels[0]

    @property
    def integer_timesteps(self):
        """Whether every model timestep is an integer (int64 inputs take them exactly)."""
        return self.timesteps.dtype == np.int64

    @cached_property
    def multistep(self):
        """Whether some row reads or writes the images' history slots (asked at every admit: computed once)."""
        return any(is_multistep(row) for row in self.coeffs)

    def rows_float32(self):
        """The coefficient table as a C-contiguous float32 (n, 9) array for the kernels."""
        return np.ascontiguousarray(self.coeffs, dtype=np.float32)


def make_plan(
    config,
    steps=None,
    *,
    method="ddim",
    eta=0.0,
    timesteps=None,
    use_clipped_model_output=False,
    options=None,
    start=0,
):
    """Coefficient rows for `steps` (or explicit DDPM `timesteps`) of DDIM (Song et al. 2020), DDPM (Ho et al. 2020)
    or a solver of engine/core/solvers/ (with its SolverOptions); from step `start` on (image-to-image, as diffusers'
    img2img pipelines run `timesteps[start:]` after set_begin_index)."""
    if isinstance(config, dict):
        config = SchedulerConfig.from_dict(config)
    if not isinstance(config, SchedulerConfig):
        raise TypeError(f"config must be a SchedulerConfig or a scheduler config dict, got {type(config).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    eta = _check_eta(eta, method)
    if method in SOLVERS:
        if timesteps is not None:
            raise ValueError(f"explicit timesteps are supported for method 'ddpm' only, got method {method!r}")
        steps = check_steps(steps, config.num_train_timesteps)
        return _solver_plan(
            config, steps, method, options or SolverOptions(), _start(start, steps + (method == "plms"))
        )
    if not isinstance(use_clipped_model_output, (bool, np.bool_)):
        raise ValueError(f"use_clipped_model_output must be True or False, got {use_clipped_model_output!r}")
    T = config.num_train_timesteps
    ts = _timesteps(config, steps, timesteps, method)
    _check_in_range(ts, T)
    abar = config.alphas_cumprod()
    _check_zero_snr(config, abar, ts)
    if method == "ddim":
        final = 1.0 if config.set_alpha_to_one else float(abar[0])
        rows = [_ddim_row(config, abar, t, t - T // len(ts), final, eta, use_clipped_model_output) for t in ts]
    else:
        prevs = list(ts[1:]) + [-1]
        rows = [_ddpm_row(config, abar, t, p) for t, p in zip(ts, prevs)]
    start = _start(start, len(ts))
    coeffs = np.array(rows, dtype=np.float64)[start:]
    ts = ts[start:]
    _check_finite(coeffs, ts)
    clip = float(config.clip_sample_range) if config.clip_sample else None
    coeffs[:, CLIP] = clip or 0.0
    levels = (*(float(abar[t]) for t in ts), 1.0)
    return StepPlan(timesteps=ts, coeffs=coeffs, clip=clip, method=method, eta=eta, levels=levels)


def _start(start, length):
    """The first step run: an integer in [0, length)."""
    if isinstance(start, (bool, np.bool_)) or not isinstance(start, (int, np.integer)) or not 0 <= start < length:
        raise ValueError(f"start must be an integer in [0, {length - 1}] (the steps' indices), got {start!r}")
    return int(start)


def _solver_plan(config, steps, method, options, start):
    """The StepPlan of a multistep or sigma-space solver; its rows never clip (the diffusers classes do not)."""
    abar = config.alphas_cumprod()
    timesteps, coeffs, init_scale = SOLVERS[method][1](config, abar, steps, options, start)
    _check_finite(coeffs, timesteps)
    return StepPlan(
        timesteps=timesteps,
        coeffs=coeffs,
        clip=None,
        method=method,
        eta=0.0,
        init_scale=init_scale,
        levels=(*noise_levels(method, config, abar, steps, options)[start:].tolist(), 1.0),
    )


def _check_eta(eta, method):
    ok = isinstance(eta, (int, float, np.integer, np.floating)) and not isinstance(eta, (bool, np.bool_))
    if not ok or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if method != "ddim" and eta != 0:
        raise ValueError(f"eta applies to method 'ddim' only; method {method!r} needs eta=0, got {eta!r}")
    return float(eta)


def _timesteps(config, steps, timesteps, method):
    T = config.num_train_timesteps
    if (steps is None) == (timesteps is None):
        raise ValueError(f"give exactly one of steps or timesteps, got steps={steps!r}, timesteps={timesteps!r}")
    if timesteps is None:
        return inference_timesteps(T, check_steps(steps, T), config.timestep_spacing, config.steps_offset)
    if method != "ddpm":  # diffusers' DDIMScheduler steps to t - T // n and has no custom timesteps
        raise ValueError(f"explicit timesteps are supported for method 'ddpm' only, got method {method!r}")
    return check_timesteps(timesteps, T)


def _check_in_range(ts, T):
    if ts.max() >= T:  # leading + steps_offset at steps = T reaches T (diffusers issue #10003 indexes out of range)
        raise ValueError(
            f"timestep {int(ts.max())} is outside the trained range [0, {T - 1}] "
            f"(leading spacing with steps_offset; use fewer steps or steps_offset=0)"
        )
    if ts.min() < 0:  # trailing: float arange rounding adds an extra step at -1 for some T (never for T = 1000)
        raise ValueError(
            f"timestep {int(ts.min())} is outside the trained range [0, {T - 1}] "
            f"(diffusers' trailing spacing gives {len(ts)} timesteps for num_train_timesteps={T}; "
            "use another step count or spacing)"
        )


def _check_zero_snr(config, abar, ts):
    zero = [int(t) for t in ts if abar[t] == 0.0]
    if zero and config.prediction_type == "epsilon":
        raise ValueError(
            f"prediction_type 'epsilon' cannot give x0 at timestep {zero[0]} where alphas_cumprod = 0 "
            "(rescale_betas_zero_snr=True: x0 = (x - eps)/0); use prediction_type 'v_prediction' "
            "or a spacing that does not visit the last training timestep"
        )


def _check_finite(coeffs, ts):
    bad = np.flatnonzero(~np.isfinite(coeffs).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"non-finite step coefficients at step {i} (timestep {ts[i]:g}): {coeffs[i].tolist()}")


def _x0_coeffs(prediction_type, a):
    """(ax, am) with x0 = ax*x + am*m for epsilon, v (Salimans & Ho 2022) or sample prediction."""
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction_type == "epsilon":
        return 1.0 / sa, -sb / sa
    if prediction_type == "v_prediction":
        return sa, -sb
    return 0.0, 1.0


def _ddim_row(config, abar, t, prev, final, eta, use_clipped):
    """DDIM eq. 12/16: x' = sqrt(a_p)*x0 + sqrt(1 - a_p - sigma^2)*eps + sigma*z, as diffusers' DDIMScheduler.step."""
    a = float(abar[t])
    ap = float(abar[prev]) if prev >= 0 else final
    sa, sb = math.sqrt(a), math.sqrt(1.0 - a)
    row = blank_row()
    row[AX], row[AM] = _x0_coeffs(config.prediction_type, a)
    if use_clipped:  # eps re-derived from the (clipped) x0
        row[BX], row[B0] = 1.0 / sb, -sa / sb
    elif config.prediction_type == "epsilon":
        row[BM] = 1.0
    elif config.prediction_type == "v_prediction":
        row[BX], row[BM] = sb, sa
    else:  # sample: diffusers derives eps from the unclipped model output
        row[BX], row[BM] = 1.0 / sb, -sa / sb
    sigma = eta * math.sqrt((1.0 - ap) / (1.0 - a) * (1.0 - a / ap))
    direction = 1.0 - ap - sigma * sigma
    if direction < 0:
        if eta > 1.0:
            raise ValueError(
                f"eta={eta} is too large at timestep {t}: 1 - alpha_prev - sigma^2 = {direction:.3g} < 0 (use eta <= 1)"
            )
        direction = 0.0  # rounding when a_p = 1
    row[P0], row[PE] = math.sqrt(ap), math.sqrt(direction)
    row[SIGMA] = sigma if eta > 0 else 0.0
    return row


def _ddpm_row(config, abar, t, prev):
    """DDPM posterior mean (Ho et al. 2020, eq. 7) with the strided beta, as diffusers' DDPMScheduler.step."""
    a = float(abar[t])
    ap = float(abar[prev]) if prev >= 0 else 1.0
    beta = 1.0 - a / ap  # "current_beta_t" of the strided schedule
    row = blank_row()
    row[AX], row[AM] = _x0_coeffs(config.prediction_type, a)
    row[P0] = math.sqrt(ap) * beta / (1.0 - a)
    row[PX] = math.sqrt(a / ap) * (1.0 - ap) / (1.0 - a)
    if t > 0:  # diffusers adds noise whenever the current timestep is > 0
        small = max((1.0 - ap) / (1.0 - a) * beta, 1e-20)
        row[SIGMA] = math.sqrt(beta if config.variance_type == "fixed_large" else small)
    return row
