"""PLMS (Liu et al. 2022, arXiv 2202.09778, eq. 12 with the transfer x_t -> x_{t-delta} of eq. 9) as diffusers'
PNDMScheduler with skip_prk_steps=True: n + 1 model calls, Adams-Bashforth over the last four model outputs."""

import math

import numpy as np

from ddengine.core.rows import AM, AX, BM, BX, PD, PH0, PS, PX, Q0, QE, SL, SX, WRITE_D, WRITE_S, blank_row
from ddengine.core.solvers.common import slot
from ddengine.core.timesteps import inference_timesteps

# Adams-Bashforth weights of the newest .. oldest model output, by how many diffusers' `ets` holds
AB_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms_timesteps(config, steps):
    """PNDMScheduler `set_timesteps` with skip_prk_steps: the descending timesteps, the second one repeated."""
    ts = inference_timesteps(config.num_train_timesteps, steps, config.timestep_spacing, config.steps_offset)[::-1]
    return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.int64)


def plms_plan(config, abar, steps, options=None, start=0):
    """(timesteps, rows, init_scale 1.0) of PLMS; `options` (the sigma-space solvers' keys) do not apply. From entry
    `start` of its timesteps on (image-to-image: PNDMScheduler's counter and history restart there)."""
    if config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"method 'plms' (PNDMScheduler) supports prediction_type 'epsilon' or 'v_prediction', "
            f"got {config.prediction_type!r}"
        )
    timesteps = plms_timesteps(config, steps)
    ratio = config.num_train_timesteps // steps
    _check_reads(abar, [*timesteps, *(timesteps[1:2] + ratio)])
    final = 1.0 if config.set_alpha_to_one else float(abar[0])
    timesteps = timesteps[start:]
    rows = [_row(config.prediction_type, abar, final, timesteps, ratio, c) for c in range(len(timesteps))]
    return timesteps, np.array(rows, dtype=np.float64), 1.0


def _check_reads(abar, ts):
    """Refuse a timestep whose alphas_cumprod diffusers would read out of range (or divide by, when it is 0)."""
    for t in ts:
        if not 0 <= t < len(abar):
            raise ValueError(f"method 'plms' reads alphas_cumprod at timestep {t}, outside [0, {len(abar) - 1}]")
        if abar[t] == 0:
            raise ValueError(f"method 'plms' divides by alphas_cumprod = 0 at timestep {t} (rescale_betas_zero_snr)")


def _row(prediction_type, abar, final, timesteps, ratio, counter):
    """Step `counter` of diffusers' step_plms: d = this model output, kept as ets[k] in slot(k) (not at counter 1)."""
    t = int(timesteps[counter])
    row = _output_row(prediction_type, float(abar[t]))
    if counter == 1:  # restart from the saved x at t + ratio with the mean of the first two outputs
        sample_coeff, output_coeff = _transfer(prediction_type, abar, final, t + ratio, t)
        row[SL], row[PS] = 1.0, sample_coeff
        row[PD] = row[PH0 + slot(0)] = 0.5 * output_coeff
        return row
    sample_coeff, output_coeff = _transfer(prediction_type, abar, final, t, t - ratio)
    k = max(counter - 1, 0)  # this output's index in diffusers' ets (the counter-1 output is never appended)
    row[PX], row[WRITE_D] = sample_coeff, float(slot(k))
    if counter == 0:
        row[SX], row[WRITE_S] = 1.0, 1.0
    weights = AB_WEIGHTS[min(k + 1, 4)]
    row[PD] = weights[0] * output_coeff
    for j, w in enumerate(weights[1:], start=1):
        row[PH0 + slot(k - j)] = w * output_coeff
    return row


def _output_row(prediction_type, alpha_prod):
    """A blank row with the model's x0 and eps at alpha_prod and d = q0 x0 + qe eps its raw output (eps or v)."""
    # diffusers' ets hold raw outputs: it converts v to eps after combining them, at the step's own alpha and sample
    row = blank_row()
    alpha, sigma = math.sqrt(alpha_prod), math.sqrt(1.0 - alpha_prod)
    if prediction_type == "epsilon":
        row[AX], row[AM], row[BM], row[QE] = 1.0 / alpha, -sigma / alpha, 1.0, 1.0
    else:  # v = alpha eps - sigma x0
        row[AX], row[AM], row[BX], row[BM] = alpha, -sigma, sigma, alpha
        row[Q0], row[QE] = -sigma, alpha
    return row


def _transfer(prediction_type, abar, final, t, prev):
    """(sample coefficient, model-output coefficient) of PNDMScheduler._get_prev_sample (PNDM eq. 9) from t to prev."""
    a_t, a_prev = float(abar[t]), final if prev < 0 else float(abar[prev])
    sample_coeff = math.sqrt(a_prev / a_t)
    eps_coeff = -(a_prev - a_t) / (a_t * math.sqrt(1.0 - a_prev) + math.sqrt(a_t * (1.0 - a_t) * a_prev))
    if prediction_type == "epsilon":
        return sample_coeff, eps_coeff
    # diffusers turns the combined v into eps = sqrt(a_t) v + sqrt(1 - a_t) x with the x it steps
    return sample_coeff + eps_coeff * math.sqrt(1.0 - a_t), eps_coeff * math.sqrt(a_t)
