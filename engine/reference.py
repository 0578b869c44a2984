"""Unfused numpy evaluation of one coefficient row (engine/coeffs.py): the oracle and the baseline."""
import numpy as np

from ddengine.coeffs import AM, AX, B0, BM, BX, P0, PE, PX, SIGMA


def guided_output(model_out, guidance):
    """Classifier-free guidance (Ho & Salimans 2022): u + g*(c - u); model_out = [uncond; cond] on axis 0."""
    if guidance is None:
        return model_out
    uncond, cond = np.split(model_out, 2, axis=0)
    return uncond + guidance * (cond - uncond)


def reference_step(x, model_out, row, noise=None, *, guidance=None, clip=None, dtype=np.float64):
    """One sampler step x_t -> x_{t-1} evaluated term by term in `dtype` (float64 for the oracle)."""
    x = np.asarray(x, dtype=dtype)
    m = guided_output(np.asarray(model_out, dtype=dtype), guidance)
    row = np.asarray(row, dtype=dtype)
    x0 = row[AX] * x + row[AM] * m
    if clip is not None:
        x0 = np.clip(x0, -clip, clip)
    eps = row[BX] * x + row[BM] * m + row[B0] * x0
    out = row[P0] * x0 + row[PX] * x + row[PE] * eps
    if row[SIGMA] != 0:
        out = out + row[SIGMA] * np.asarray(noise, dtype=dtype)
    return out
