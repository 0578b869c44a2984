"""Each solver's float64 rows, run by the numpy reference (engine/core/reference.py), follow its diffusers scheduler
(the oracle) through a whole sampling loop: same model timesteps, same model inputs, same final sample.

The model is a fixed smooth function of (x, t), so every step's output depends on the trajectory so far; the
oracle scheduler gets the float64 alphas_cumprod the engine uses (tests/core/test_plan_vs_diffusers.py) and keeps its
own step code. Metric: max|ours - diffusers| / max|diffusers| per model input and at the end.
"""

import inspect
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

from ddengine.core.reference import reference_step  # noqa: E402
from ddengine.core.rows import SLOTS  # noqa: E402
from ddengine.core.schedule import SchedulerConfig  # noqa: E402
from ddengine.core.solvers import SOLVERS, SolverOptions  # noqa: E402

TOL = 2e-5
SHAPE = (2, 1, 4, 4)
# diffusers' Euler schedulers step x_sigma = x * sqrt(sigma^2 + 1) in float32, so their own rounding grows with
# sigma_max (20291 for the cosine schedule): the tolerance of an Euler case is that rounding.
SCHEDULES = (
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
)


def model(x, t, prediction_type):
    """A deterministic stand-in for the U-Net: smooth in x, varying with t."""
    pattern = np.linspace(-1.0, 1.0, int(np.prod(SHAPE[1:]))).reshape(SHAPE[1:])
    out = 0.6 * np.tanh(x) + 0.3 * np.cos(t / 170.0 + 3.0 * pattern)
    return (0.8 * out if prediction_type == "sample" else out).astype(np.float32)


def oracle(cls_name, config, **solver_keys):
    cls = getattr(diffusers, cls_name)
    keys = {
        k: v
        for k, v in vars(config).items()
        if k in inspect.signature(cls.__init__).parameters and k != "trained_betas"
    }
    sched = cls(**keys, **solver_keys)
    sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), dim=0)
    return sched


def run_oracle(sched, steps, z, noises, prediction_type, monkeypatch):
    draws = iter(noises)
    monkeypatch.setattr(
        scheduling_euler_ancestral_discrete, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(draws))
    )
    sched.set_timesteps(steps)
    latents = torch.from_numpy(z) * sched.init_noise_sigma
    inputs = []
    for t in sched.timesteps:
        x_in = sched.scale_model_input(latents, t).float()
        inputs.append(x_in.numpy().astype(np.float64))
        m = torch.from_numpy(model(x_in.numpy(), float(t), prediction_type))
        latents = sched.step(m, t, latents).prev_sample
    return sched.timesteps.numpy(), inputs, latents.numpy().astype(np.float64)


def run_rows(timesteps, rows, init_scale, z, noises, prediction_type):
    x = z.astype(np.float64) * init_scale
    slots = np.zeros((SLOTS, *SHAPE))
    inputs = []
    for i, (t, row) in enumerate(zip(timesteps, rows)):
        inputs.append(x)
        m = model(x.astype(np.float32), float(t), prediction_type)
        x = reference_step(x, m, row, noises[i], slots=slots)
    return inputs, x


def tolerance(method, sched):
    """TOL, or the oracle's own float32 rounding where it grows with the noise level (Euler; PLMS)."""
    if method.startswith("euler"):
        return max(TOL, 8 * float(sched.sigmas.max()) * 2.0**-24)
    if method == "plms":
        # PNDMScheduler scales x by sqrt(abar_prev/abar_t), up to sqrt(1/abar_t) ~ sigma_max as Euler's x_sigma, in
        # float32 and cancels it against the v -> eps conversion: v_prediction from t = 999 of the cosine schedule is
        # 4e-4 off in float32, 2e-12 when the same oracle steps float64 samples and model outputs.
        abar = sched.alphas_cumprod[sched.timesteps]
        return max(TOL, 8 * float(((1 - abar) / abar).max() ** 0.5) * 2.0**-24)
    return TOL


def diffusers_lacks(method, steps, prediction, karras, schedule):
    """Cases the diffusers class cannot run."""
    if method in ("euler-a", "plms") and (karras or prediction == "sample"):
        return True  # no Karras sigmas in either; EulerAncestral has no 'sample', PNDMScheduler raises on it
    # UniPCMultistepScheduler rounds Karras t for the cosine schedule too (DPMSolverMultistepScheduler does not): at 10
    # and 25 steps the first timestep 999 repeats, so its step index starts at 1 and runs past the end (AssertionError)
    return method == "unipc" and karras and schedule == 0 and steps >= 10


def oracle_keys(method, karras):
    """The solver keys of the oracle's class for a case."""
    if method == "euler-a":
        return {}
    if method == "plms":
        return {"skip_prk_steps": True}
    keys = {"use_karras_sigmas": karras}
    if method.startswith("dpmpp"):
        keys["solver_order"] = int(method[-2])
    return keys


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [
    (method, steps, spacing, prediction, karras, schedule)
    for method in SOLVERS
    for steps, spacing, prediction, karras, schedule in itertools.product(
        (5, 10, 25), ("linspace", "leading", "trailing"), ("epsilon", "v_prediction", "sample"), (False, True), (0, 1)
    )
    if not diffusers_lacks(method, steps, prediction, karras, schedule)
]


@pytest.mark.parametrize("method, steps, spacing, prediction, karras, schedule", CASES)
def test_solver_follows_diffusers(method, steps, spacing, prediction, karras, schedule, monkeypatch):
    config = SchedulerConfig(
        **SCHEDULES[schedule], prediction_type=prediction, timestep_spacing=spacing, clip_sample=False
    )
    cls_name, build = SOLVERS[method]
    keys = oracle_keys(method, karras)
    rng = np.random.default_rng(steps)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps + 1)]
    sched = oracle(cls_name, config, **keys)
    ts, inputs, final = run_oracle(sched, steps, z, noises, prediction, monkeypatch)
    timesteps, rows, init_scale = build(
        config, config.alphas_cumprod(), steps, SolverOptions(use_karras_sigmas=karras), 0
    )
    np.testing.assert_array_equal(timesteps, ts.astype(timesteps.dtype))
    assert np.array_equal(timesteps, ts)  # the model sees diffusers' timesteps exactly
    ours_inputs, ours = run_rows(timesteps, rows, init_scale, z, noises, prediction)
    tol = tolerance(method, sched)
    for i, (a, b) in enumerate(zip(ours_inputs, inputs)):
        assert rel(a, b) < tol, f"model input of step {i}"
    assert rel(ours, final) < tol


def test_plms_refuses_sample_prediction():
    config = SchedulerConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="'plms'.*'sample'"):
        SOLVERS["plms"][1](config, config.alphas_cumprod(), 10, SolverOptions(), 0)
