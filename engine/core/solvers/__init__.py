"""The multistep and sigma-space solvers, each a float64 table builder over engine/core/rows.py: its diffusers class,
and `build(config, abar, steps, options) -> (timesteps, rows, init_scale)`."""

from ddengine.core.solvers.common import SolverOptions
from ddengine.core.solvers.dpmpp import dpmpp_plan
from ddengine.core.solvers.euler import euler_plan
from ddengine.core.solvers.pndm import plms_plan
from ddengine.core.solvers.unipc import unipc_plan

# method -> (diffusers class, table builder)
SOLVERS = {
    "dpmpp-2m": ("DPMSolverMultistepScheduler", lambda c, a, n, o: dpmpp_plan(c, a, n, o, order=2)),
    "dpmpp-3m": ("DPMSolverMultistepScheduler", lambda c, a, n, o: dpmpp_plan(c, a, n, o, order=3)),
    "euler": ("EulerDiscreteScheduler", lambda c, a, n, o: euler_plan(c, a, n, o)),
    "euler-a": ("EulerAncestralDiscreteScheduler", lambda c, a, n, o: euler_plan(c, a, n, o, ancestral=True)),
    "unipc": ("UniPCMultistepScheduler", lambda c, a, n, o: unipc_plan(c, a, n, o)),
    "plms": ("PNDMScheduler", lambda c, a, n, o: plms_plan(c, a, n, o)),
}

__all__ = ["SOLVERS", "SolverOptions"]
