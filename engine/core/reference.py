"""Unfused numpy evaluation of one coefficient row (engine/core/rows.py): the oracle and the baseline."""

import numpy as np

from ddengine.core.rows import (
    AM,
    AX,
    B0,
    BM,
    BX,
    CLIP,
    HISTORY_SLOTS,
    P0,
    PD,
    PE,
    PH0,
    PS,
    PX,
    Q0,
    QE,
    SD,
    SH0,
    SIGMA,
    SL,
    SX,
    WRITE_D,
    WRITE_S,
    is_multistep,
)


def guided_output(cond, uncond=None, guidance=None):
    """Classifier-free guidance (Ho & Salimans 2022): u + g*(c - u); the conditional output alone without it."""
    if guidance is None or uncond is None:
        return cond
    return uncond + guidance * (cond - uncond)


def predicted_x0(x, m, row, dtype=np.float64):
    """x0 = ax*x + am*m, clipped to [-clip, clip] where the row clips: the model's estimate of the clean image."""
    row = np.asarray(row, dtype=dtype)
    x0 = row[AX] * np.asarray(x, dtype=dtype) + row[AM] * np.asarray(m, dtype=dtype)
    return np.clip(x0, -row[CLIP], row[CLIP]) if row[CLIP] > 0 else x0


def reference_step(x, cond, row, noise=None, *, uncond=None, guidance=None, slots=None, dtype=np.float64):
    """One sampler step x_t -> x_{t-1} evaluated term by term in `dtype` (float64 for the oracle).

    `slots` (L, H0, H1, H2 stacked on axis 0, each shaped as x) is read and updated in place by a multistep row."""
    x = np.asarray(x, dtype=dtype)
    m = guided_output(
        np.asarray(cond, dtype=dtype), None if uncond is None else np.asarray(uncond, dtype=dtype), guidance
    )
    row = np.asarray(row, dtype=dtype)
    x0 = predicted_x0(x, m, row, dtype)
    eps = row[BX] * x + row[BM] * m + row[B0] * x0
    out = row[P0] * x0 + row[PX] * x + row[PE] * eps
    if is_multistep(row):
        if slots is None:
            raise ValueError("a multistep row needs the image's slots")
        history = [slots[1 + k] for k in range(HISTORY_SLOTS)]
        d = row[Q0] * x0 + row[QE] * eps
        s = row[SX] * x + row[SL] * slots[0] + row[SD] * d + sum(row[SH0 + k] * h for k, h in enumerate(history))
        out = out + row[PS] * s + row[PD] * d + sum(row[PH0 + k] * h for k, h in enumerate(history))
        if row[WRITE_S]:
            slots[0] = s
        if row[WRITE_D] >= 0:
            slots[1 + int(row[WRITE_D])] = d
    if row[SIGMA] != 0:
        out = out + row[SIGMA] * np.asarray(noise, dtype=dtype)
    return out
