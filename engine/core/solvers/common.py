"""What diffusers' sigma-space schedulers share: float32 sigma tables, Karras sigmas, sigma -> t, VP alpha/sigma."""

import math
from dataclasses import dataclass

import numpy as np

from ddengine.core.rows import AM, AX, HISTORY_SLOTS, blank_row

FINAL_SIGMAS = ("zero", "sigma_min")


@dataclass(frozen=True)
class SolverOptions:
    """The solver keys of diffusers' multistep and Euler scheduler configs (their defaults)."""

    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"
    lower_order_final: bool = True
    euler_at_final: bool = False


def sigma_space_abar(config, abar):
    """alphas_cumprod as the sigma-space schedulers read it: a zero terminal SNR becomes 2**-24 (diffusers' stand-in,
    so that sigma stays finite)."""
    if not config.rescale_betas_zero_snr:
        return abar
    abar = abar.copy()
    abar[-1] = 2.0**-24
    return abar


def train_sigmas(abar):
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep (float64), diffusers' `sigmas`."""
    return np.sqrt((1.0 - abar) / abar)


def karras_sigmas(descending, steps):
    """Karras et al. 2022 eq. 5 with rho = 7 between the first and last of `descending` sigmas (float64)."""
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    lo, hi = float(descending[-1]) ** (1 / rho), float(descending[0]) ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas, log_train_sigmas):
    """diffusers' `_sigma_to_t`: the fractional timestep of each sigma, by linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    dists = log_sigma - log_train_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_train_sigmas) - 2)
    lo, hi = log_train_sigmas[low], log_train_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return (1 - w) * low + w * (low + 1)


def final_sigma(abar, final_sigmas_type):
    """The sigma after the last step: 0, or the smallest training sigma (final_sigmas_type 'sigma_min')."""
    if final_sigmas_type not in FINAL_SIGMAS:
        raise ValueError(
            f"final_sigmas_type must be one of {', '.join(map(repr, FINAL_SIGMAS))}, got {final_sigmas_type!r}"
        )
    return 0.0 if final_sigmas_type == "zero" else float(train_sigmas(abar[:1])[0])


def as_float32(values):
    """Rounded to float32 as diffusers stores its sigma table, returned as float64 for the coefficient arithmetic."""
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def vp(sigma):
    """(alpha_t, sigma_t) of the variance-preserving x_t at sigma: 1/sqrt(sigma^2 + 1), sigma/sqrt(sigma^2 + 1)."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def log_snr(sigma):
    """lambda_t = log(alpha_t / sigma_t) = -log(sigma) (DPM-Solver, Lu et al. 2022); +inf at sigma = 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


def x0_row(prediction_type, sigma):
    """A blank row whose x0 = ax*x + am*m is the data prediction at sigma (VP x), no clipping."""
    alpha, sigma_t = vp(sigma)
    row = blank_row()
    if prediction_type == "epsilon":
        row[AX], row[AM] = 1.0 / alpha, -sigma_t / alpha
    elif prediction_type == "v_prediction":
        row[AX], row[AM] = alpha, -sigma_t
    else:
        row[AX], row[AM] = 0.0, 1.0
    return row


def slot(step):
    """The history slot where step `step` keeps its prediction (a ring over rows.HISTORY_SLOTS)."""
    return step % HISTORY_SLOTS
