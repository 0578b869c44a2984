"""Euler (Karras et al. 2022, Alg. 1 with s_churn = 0) and Euler ancestral as diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler, rewritten on the engine's x (the model input x_sigma / sqrt(sigma^2 + 1)), so
init_noise_sigma and scale_model_input live in the rows: x' = px x + p0 x0 (+ sigma_up/s' z)."""

import math

import numpy as np

from ddengine.core.rows import P0, PX, SIGMA
from ddengine.core.solvers.common import (
    as_float32,
    final_sigma,
    karras_sigmas,
    sigma_space_abar,
    sigma_to_t,
    train_sigmas,
    x0_row,
)


def euler_timesteps(T, steps, spacing, steps_offset):
    """EulerDiscreteScheduler `set_timesteps`: float timesteps (fractional for 'linspace')."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        ratio = T // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32).astype(np.float64) + steps_offset
    return (np.arange(T, 0, -T / steps)).round().astype(np.float32).astype(np.float64) - 1


def euler_sigmas(config, abar, steps, options, ancestral):
    """(timesteps, sigmas with the final one appended) as the Euler schedulers build them (float32-rounded)."""
    abar = sigma_space_abar(config, abar)
    timesteps = euler_timesteps(config.num_train_timesteps, steps, config.timestep_spacing, config.steps_offset)
    sigmas = train_sigmas(abar)
    picked = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
    if options.use_karras_sigmas and not ancestral:
        picked = karras_sigmas(picked, steps)
        timesteps = sigma_to_t(picked, np.log(sigmas))
    last = 0.0 if ancestral else final_sigma(abar, options.final_sigmas_type)
    return as_float32(timesteps), as_float32(np.concatenate([picked, [last]]))


def euler_plan(config, abar, steps, options, ancestral=False, start=0):
    """(timesteps float64, rows, init_scale): x_T = init_noise_sigma z / sqrt(sigma_max^2 + 1) on the engine's x;
    from step `start` on (image-to-image)."""
    timesteps, sigmas = euler_sigmas(config, abar, steps, options, ancestral)
    rows = [
        _row(config.prediction_type, float(sigmas[i]), float(sigmas[i + 1]), ancestral) for i in range(start, steps)
    ]
    top = float(np.float32(sigmas.max()))
    noise_sigma = top if config.timestep_spacing in ("linspace", "trailing") else math.sqrt(top * top + 1.0)
    return timesteps[start:], np.array(rows, dtype=np.float64), noise_sigma / math.sqrt(float(sigmas[0]) ** 2 + 1.0)


def _row(prediction_type, sigma, sigma_next, ancestral):
    """x_sigma' = x_sigma + (x_sigma - x0)/sigma * (sigma_down - sigma) + sigma_up z, divided by s' = sqrt(sigma'^2+1)."""
    row = x0_row(prediction_type, sigma)
    if ancestral:
        up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        down = math.sqrt(sigma_next**2 - up**2)
    else:
        up, down = 0.0, sigma_next
    scale, scale_next = math.sqrt(sigma * sigma + 1.0), math.sqrt(sigma_next * sigma_next + 1.0)
    dt_over_sigma = (down - sigma) / sigma
    row[PX] = scale * (1.0 + dt_over_sigma) / scale_next
    row[P0] = -dt_over_sigma / scale_next
    row[SIGMA] = up / scale_next
    return row
