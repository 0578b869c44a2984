"""DPM-Solver++(2M) and (3M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2) as diffusers' DPMSolverMultistepScheduler
with algorithm_type 'dpmsolver++' and solver_type 'midpoint': one row per step over the x0 history slots."""

import math

import numpy as np

from ddengine.core.rows import P0, PH0, PX, Q0, WRITE_D
from ddengine.core.solvers.common import (
    as_float32,
    final_sigma,
    karras_sigmas,
    log_snr,
    sigma_space_abar,
    sigma_to_t,
    slot,
    train_sigmas,
    vp,
    x0_row,
)


def multistep_timesteps(T, steps, spacing, steps_offset):
    """DPMSolverMultistepScheduler/UniPCMultistepScheduler `set_timesteps` (lambda_min_clipped = -inf): int64."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    return np.arange(T, 0, -T / steps).round().copy().astype(np.int64) - 1


def multistep_sigmas(config, abar, steps, options, *, round_karras_t):
    """(timesteps int64, sigmas float64 of n + 1 entries, float32-rounded) as the multistep schedulers build them."""
    T = config.num_train_timesteps
    abar = sigma_space_abar(config, abar)
    timesteps = multistep_timesteps(T, steps, config.timestep_spacing, config.steps_offset)
    sigmas = train_sigmas(abar)
    if options.use_karras_sigmas:
        picked = karras_sigmas(sigmas[::-1], steps)
        t = sigma_to_t(picked, np.log(sigmas))
        timesteps = (t.round() if round_karras_t else t).astype(np.int64)  # float -> int64 truncates, as torch does
    else:
        picked = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
    return timesteps, as_float32(np.concatenate([picked, [final_sigma(abar, options.final_sigmas_type)]]))


def dpmpp_plan(config, abar, steps, options, order, start=0):
    """(timesteps, rows, init_scale 1.0) of DPM-Solver++(order M) with diffusers' lower-order warm-up and final steps;
    from step `start` on (image-to-image: diffusers' set_begin_index, the warm-up restarting there)."""
    round_t = config.beta_schedule != "squaredcos_cap_v2"  # diffusers keeps fractional Karras t for the cosine schedule
    timesteps, sigmas = multistep_sigmas(config, abar, steps, options, round_karras_t=round_t)
    n = len(timesteps)
    rows = []
    for i in range(start, n):
        final = i == n - 1 and (
            options.euler_at_final or (options.lower_order_final and n < 15) or options.final_sigmas_type == "zero"
        )
        second = i == n - 2 and options.lower_order_final and n < 15
        done = i - start  # updates since the (re)start: the history it has
        used = 1 if (order == 1 or done < 1 or final) else 2 if (order == 2 or done < 2 or second) else 3
        rows.append(_row(config.prediction_type, sigmas, i, used))
    return timesteps[start:], np.array(rows, dtype=np.float64), 1.0


def _row(prediction_type, sigmas, i, order):
    """x' = (sigma_t/sigma_s0) x + sum_k c_k D_{i-k}: the row of step i at `order`, D_i written to slot(i)."""
    row = x0_row(prediction_type, float(sigmas[i]))
    row[Q0], row[WRITE_D] = 1.0, float(slot(i))
    weights = _weights(sigmas, i, order)
    row[PX] = weights[0]
    row[P0] = weights[1]  # D_i is x0 itself
    for k, c in enumerate(weights[2:], start=1):
        row[PH0 + slot(i - k)] = c
    return row


def _weights(sigmas, i, order):
    """[coefficient of x, of D_i, D_{i-1}, ...] of diffusers' first/second/third-order dpmsolver++ updates."""
    alpha_t, sigma_t = vp(float(sigmas[i + 1]))
    _, sigma_s0 = vp(float(sigmas[i]))
    lam = [log_snr(float(sigmas[i + 1 - k])) for k in range(order + 1)]  # lambda_t, lambda_s0, lambda_s1, ...
    h = lam[0] - lam[1]
    em1 = -1.0 if math.isinf(h) else math.expm1(-h)  # exp(-h) - 1
    a = alpha_t * em1
    ratio = sigma_t / sigma_s0
    if order == 1:
        return [ratio, -a]
    r0 = (lam[1] - lam[2]) / h
    d1_0 = np.array([1.0, -1.0, 0.0]) / r0  # D1_0 = (m0 - m1) / r0 over [m0, m1, m2]
    if order == 2:  # midpoint: x_t = ratio x - a D0 - 0.5 a D1
        d = np.array([-a, 0.0, 0.0]) - 0.5 * a * d1_0
        return [ratio, *d[:2]]
    r1 = (lam[2] - lam[3]) / h
    d1_1 = np.array([0.0, 1.0, -1.0]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    b = alpha_t * (em1 / h + 1.0)
    c = alpha_t * ((em1 + h) / h**2 - 0.5)
    d = np.array([-a, 0.0, 0.0]) + b * d1 - c * d2
    return [ratio, *d]
