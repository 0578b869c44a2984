"""The multistep and sigma-space solvers, each a float64 table builder over engine/core/rows.py: its diffusers class,
and `build(config, abar, steps, options, start) -> (timesteps, rows, init_scale)` (the steps from `start` on)."""

import numpy as np

from ddengine.core.solvers.common import SolverOptions
from ddengine.core.solvers.dpmpp import dpmpp_plan, multistep_sigmas
from ddengine.core.solvers.euler import euler_plan, euler_sigmas
from ddengine.core.solvers.pndm import plms_plan, plms_timesteps
from ddengine.core.solvers.unipc import unipc_plan

# method -> (diffusers class, table builder)
SOLVERS = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", lambda c, a, n, o, s: dpmpp_plan(c, a, n, o, order=2, start=s)),
    "dpmpp-3m": ("DPMSolverMultistepScheduler", lambda c, a, n, o, s: dpmpp_plan(c, a, n, o, order=3, start=s)),
    "euler": ("EulerDiscreteScheduler", lambda c, a, n, o, s: euler_plan(c, a, n, o, start=s)),
    "euler-a": (
        "EulerAncestralDiscreteScheduler",
        lambda c, a, n, o, s: euler_plan(c, a, n, o, ancestral=True, start=s),
    ),
    "unipc": ("UniPCMultistepScheduler", lambda c, a, n, o, s: unipc_plan(c, a, n, o, start=s)),
    "plms": ("PNDMScheduler", lambda c, a, n, o, s: plms_plan(c, a, n, o, start=s)),
}


def noise_levels(method, config, abar, steps, options):
    """alphas_cumprod of the noise level each step of the whole schedule begins at, as the method's diffusers class
    `add_noise`s an image to it (image-to-image, inpainting): abar[t] for PLMS, 1 / (1 + sigma^2) of the sigma
    schedule for the others."""
    if method == "plms":
        return abar[plms_timesteps(config, steps)].astype(np.float64)
    if method in ("euler", "euler-a"):
        sigmas = euler_sigmas(config, abar, steps, options, method == "euler-a")[1][:-1]
    else:
        sigmas = multistep_sigmas(config, abar, steps, options, round_karras_t=True)[1][:-1]
    return 1.0 / (1.0 + sigmas.astype(np.float64) ** 2)


__all__ = ["SOLVERS", "SolverOptions", "noise_levels"]
