"""UniPC (Zhao et al. 2023, arXiv 2302.04867, Alg. 2 with B(h) = e^h - 1, 'bh2') as diffusers' UniPCMultistepScheduler
with predict_x0: each row corrects the saved sample with UniC into s (the L slot) and steps s with UniP."""

import math

import numpy as np

from ddengine.core.rows import PD, PH0, PS, Q0, SD, SH0, SL, SX, WRITE_D, WRITE_S
from ddengine.core.solvers.common import log_snr, slot, vp, x0_row
from ddengine.core.solvers.dpmpp import multistep_sigmas


def unipc_plan(config, abar, steps, options, order=2, start=0):
    """(timesteps, rows, init_scale 1.0) of UniPC-`order` with diffusers' warm-up and lower_order_final orders; from
    step `start` on (image-to-image: the warm-up restarts there, and its first step has no corrector)."""
    timesteps, sigmas = multistep_sigmas(config, abar, steps, options, round_karras_t=True)
    if options.use_karras_sigmas and options.final_sigmas_type == "sigma_min":
        sigmas[-1] = sigmas[-2]  # diffusers ends a Karras ramp on its own last sigma, not the training sigma_min
    n = len(timesteps)
    orders = [min(order, i - start + 1, n - i if options.lower_order_final else order) for i in range(n)]
    if orders[-1] > 1 and sigmas[-1] == 0:
        raise ValueError(
            "method 'unipc' with lower_order_final=False and final_sigmas_type 'zero': the last second-order update "
            "divides by r = (lambda_s1 - lambda_s0) / h = 0 (h = inf at sigma 0; inf/nan in diffusers); "
            "use lower_order_final=True or final_sigmas_type 'sigma_min'"
        )
    rows = [
        _row(config.prediction_type, sigmas, i, orders[i], orders[i - 1] if i > start else 0) for i in range(start, n)
    ]
    return timesteps[start:], np.array(rows, dtype=np.float64), 1.0


def _row(prediction_type, sigmas, i, order, corrector_order):
    """s = UniC(L, x0_{i-1}, ..., x0_i) (s = x at step 0), x' = UniP(s, x0_i, x0_{i-1}, ...); x0_i to slot(i)."""
    row = x0_row(prediction_type, float(sigmas[i]))
    row[Q0], row[WRITE_D], row[WRITE_S] = 1.0, float(slot(i)), 1.0
    if corrector_order:
        row[SL], weights = _update(sigmas, i - 1, corrector_order, corrector=True)
        _place(row, weights, i, SD, SH0)
    else:
        row[SX] = 1.0
    row[PS], weights = _update(sigmas, i, order, corrector=False)
    _place(row, weights, i, PD, PH0)
    return row


def _place(row, weights, i, current, history):
    """Put each x0_j's weight on d (j = i) or on the history slot where step j keeps it."""
    for j, w in weights.items():
        row[current if j == i else history + slot(j)] += w


def _update(sigmas, s0, order, corrector):
    """(weight of the sample, {step j: weight of x0_j}) of diffusers' multistep_uni_p/c_bh_update from s0 to s0 + 1."""
    alpha_t, sigma_t = vp(float(sigmas[s0 + 1]))
    _, sigma_s0 = vp(float(sigmas[s0]))
    lam = [log_snr(float(sigmas[j])) for j in range(s0 + 1, s0 - order, -1)]  # lambda_t, lambda_s0, lambda_s1, ...
    h = lam[0] - lam[1]
    if h == 0:  # diffusers' Karras ramp with final_sigmas_type 'sigma_min' ends on a step that stays put
        return 1.0, {}
    hh = -h
    h_phi_1 = -1.0 if math.isinf(h) else math.expm1(hh)
    rks = [(lam[1 + k] - lam[1]) / h for k in range(1, order)] + [1.0]
    points = [s0 - k for k in range(1, order)] + [s0 + 1]
    rhos = _rhos(rks, hh, h_phi_1, corrector)
    weights = {s0: -alpha_t * h_phi_1}
    for j, r, rho in zip(points, rks, rhos):
        c = alpha_t * h_phi_1 * rho / r  # B(h) = h_phi_1 for 'bh2'; D1 = (x0_j - x0_s0) / r
        weights[j] = weights.get(j, 0.0) - c
        weights[s0] += c
    return sigma_t / sigma_s0, weights


def _b(hh, h_phi_1, order):
    """diffusers' b_i = h phi_{i+1}(h) i! / B(h), i = 1..order (UniPC eq. 8's right-hand side)."""
    h_phi_k, factorial, b = h_phi_1 / hh - 1.0, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(b)


def _rhos(rks, hh, h_phi_1, corrector):
    """UniC's rhos_c (all len(rks) points, the last the new x0) or UniP's rhos_p (the earlier x0's only)."""
    order = len(rks)
    if order == 1 or (order == 2 and not corrector):
        return [0.5] * (order - 1 + corrector)
    R = np.array([[r**k for r in rks] for k in range(order)])
    b = _b(hh, h_phi_1, order)
    return list(np.linalg.solve(R, b) if corrector else np.linalg.solve(R[:-1, :-1], b[:-1]))
