"""Unfused numpy evaluation of one coefficient row (engine/core/rows.py): the oracle and the baseline."""

import numpy as np

from ddengine.core.rows import AM, AX, B0, BM, BX, P0, PE, PX, SIGMA


def guided_output(cond, uncond=None, guidance=None):
    """Classifier-free guidance (Ho & Salimans 2022): u + g*(c - u); the conditional output alone without it."""
    if guidance is None or uncond is None:
        return cond
    return uncond + guidance * (cond - uncond)


def predicted_x0(x, m, row, clip=None, dtype=np.float64):
    """x0 = ax*x + am*m, clipped to [-clip, clip]: the model's estimate of the clean image at this step."""
    row = np.asarray(row, dtype=dtype)
    x0 = row[AX] * np.asarray(x, dtype=dtype) + row[AM] * np.asarray(m, dtype=dtype)
    return np.clip(x0, -clip, clip) if clip is not None else x0


def reference_step(x, cond, row, noise=None, *, uncond=None, guidance=None, clip=None, dtype=np.float64):
    """One sampler step x_t -> x_{t-1} evaluated term by term in `dtype` (float64 for the oracle)."""
    x = np.asarray(x, dtype=dtype)
    m = guided_output(
        np.asarray(cond, dtype=dtype), None if uncond is None else np.asarray(uncond, dtype=dtype), guidance
    )
    row = np.asarray(row, dtype=dtype)
    x0 = predicted_x0(x, m, row, clip, dtype)
    eps = row[BX] * x + row[BM] * m + row[B0] * x0
    out = row[P0] * x0 + row[PX] * x + row[PE] * eps
    if row[SIGMA] != 0:
        out = out + row[SIGMA] * np.asarray(noise, dtype=dtype)
    return out
