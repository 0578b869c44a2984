"""The multistep and sigma-space solvers, each a float64 table builder over engine/core/rows.py: its diffusers class,
and `build(config, abar, steps, options, start) -> (timesteps, rows, init_scale)` (the steps from `start` on)."""

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


def start_abar(method, config, abar, steps, options, start):
    """alphas_cumprod of the noise level step `start` begins at, as the method's diffusers class `add_noise`s an
    image to it (image-to-image): abar[t] for PLMS, 1 / (1 + sigma^2) of its sigma schedule for the others."""
    if method == "plms":
        return float(abar[int(plms_timesteps(config, steps)[start])])
    if method in ("euler", "euler-a"):
        sigma = float(euler_sigmas(config, abar, steps, options, method == "euler-a")[1][start])
    else:
        sigma = float(multistep_sigmas(config, abar, steps, options, round_karras_t=True)[1][start])
    return 1.0 / (1.0 + sigma * sigma)


__all__ = ["SOLVERS", "SolverOptions", "start_abar"]
