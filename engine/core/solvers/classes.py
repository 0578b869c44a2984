"""diffusers scheduler classes <-> engine methods: which `method` a scheduler_config.json's `_class_name` and keys
select, the SolverOptions its keys set, and each method's class and keys (for oracles and baselines)."""

import math

from ddengine.core.quoting import shown
from ddengine.core.schedule import CLASS_DEFAULTS, SchedulerConfigError
from ddengine.core.solvers.common import FINAL_SIGMAS, SolverOptions

# method -> (diffusers class, the keys that make that class this method)
METHOD_CLASSES: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
}
# Classes that only describe a training schedule here: they leave the method to the request (default ddim).
SCHEDULE_ONLY_CLASSES = ("DDPMScheduler", "DDIMScheduler")
# Keys a solver class reads, with the values the engine supports (None: any value of SolverOptions' checks).
SUPPORTED: dict[str, tuple] = {
    "algorithm_type": ("dpmsolver++",),
    "solver_order": (2, 3),
    "solver_type": ("midpoint", "bh2"),
    "predict_x0": (True,),
    "disable_corrector": ([],),
    "solver_p": (None,),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "sigma_min": (None,),
    "sigma_max": (None,),
    "shift_terminal": (None,),
    "lambda_min_clipped": (-math.inf,),
    "skip_prk_steps": (True, False),
}


def class_method(config):
    """The method a scheduler config's `_class_name` selects (None: DDPM/DDIM or no class), its keys checked."""
    name = config.get("_class_name")
    if name is None or name in SCHEDULE_ONLY_CLASSES:
        return None
    keys = {**CLASS_DEFAULTS.get(name, {}), **{k: v for k, v in config.items() if k in SUPPORTED}}
    for method, (cls, wanted) in METHOD_CLASSES.items():
        if cls == name and all(keys.get(k, v) == v for k, v in wanted.items()):
            _check_supported(name, keys)
            return method
    engine_classes = sorted({cls for cls, _ in METHOD_CLASSES.values()} - set(SCHEDULE_ONLY_CLASSES))
    if name in engine_classes:
        variants = [(m, wanted) for m, (cls, wanted) in METHOD_CLASSES.items() if cls == name]
        given = ", ".join(f"{k}={shown(keys.get(k))}" for k in variants[0][1])
        raise SchedulerConfigError(
            f"{name} with {given} is not one of the engine's solvers: "
            + "; ".join(f"{m} is {', '.join(f'{k}={shown(v)}' for k, v in w.items())}" for m, w in variants)
        )
    raise SchedulerConfigError(
        f"scheduler class {name!r} has no engine solver; the engine runs {', '.join(engine_classes)} "
        f"(and DDPM/DDIM), or pass a method (--method) to sample its training schedule with"
    )


def _check_supported(name, keys):
    for key, allowed in SUPPORTED.items():
        if key in keys and keys[key] not in allowed and not (key == "lambda_min_clipped" and keys[key] is None):
            raise SchedulerConfigError(
                f"{name} key {key}={shown(keys[key])} is not supported; the engine runs {key} "
                f"{' or '.join(map(shown, allowed))}"
            )


def solver_options(config):
    """SolverOptions from a scheduler config's keys (diffusers' defaults where it omits them), each checked."""
    options = {}
    for key in ("use_karras_sigmas", "lower_order_final", "euler_at_final"):
        value = config.get(key, getattr(SolverOptions, key))
        if not isinstance(value, bool):
            raise SchedulerConfigError(f"{key} must be true or false, got {shown(value)}")
        options[key] = value
    final = config.get("final_sigmas_type", SolverOptions.final_sigmas_type)
    if final not in FINAL_SIGMAS:
        raise SchedulerConfigError(
            f"final_sigmas_type must be one of {', '.join(map(repr, FINAL_SIGMAS))}, got {shown(final)}"
        )
    return SolverOptions(**options, final_sigmas_type=final)
