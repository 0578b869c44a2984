"""Image-to-image plans (make_plan(start=...)) follow diffusers' img2img pipelines (the oracle): the timesteps from
`t_start` on after `set_begin_index`, the image noised by the class's own `add_noise` to the first of them, then
its steps; ours noise the image to plan.start_abar and run the rows with the numpy reference."""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete  # noqa: E402

from ddengine.core.plan import METHODS, make_plan  # noqa: E402
from ddengine.core.schedule import SchedulerConfig  # noqa: E402
from ddengine.core.solvers import SolverOptions  # noqa: E402
from ddengine.core.solvers.classes import METHOD_CLASSES  # noqa: E402
from tests.core.test_solvers import SHAPE, TOL, model, oracle, rel, run_rows, tolerance  # noqa: E402


def img2img_start(steps, strength):
    """diffusers' StableDiffusionImg2ImgPipeline.get_timesteps: the first step index run."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def run_oracle(sched, steps, start, image, z, noises, prediction_type, monkeypatch):
    draws = iter(noises)
    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(draws)))
    sched.set_timesteps(steps)
    timesteps = sched.timesteps[start * sched.order :]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start * sched.order)
    latents = sched.add_noise(torch.from_numpy(image), torch.from_numpy(z), timesteps[:1])
    inputs = []
    for t in timesteps:
        x_in = sched.scale_model_input(latents, t).float()
        inputs.append(x_in.numpy().astype(np.float64))
        latents = sched.step(torch.from_numpy(model(x_in.numpy(), float(t), prediction_type)), t, latents).prev_sample
    return timesteps.numpy(), inputs, latents.numpy().astype(np.float64)


CASES = [
    (m, steps, strength, spacing, prediction)
    for m, steps, strength, spacing, prediction in itertools.product(
        METHODS, (10, 25), (0.3, 0.75), ("leading", "linspace"), ("epsilon", "v_prediction")
    )
]


@pytest.mark.parametrize("method, steps, strength, spacing, prediction", CASES)
def test_img2img_plan_follows_diffusers(method, steps, strength, spacing, prediction, monkeypatch):
    config = SchedulerConfig(
        beta_schedule="squaredcos_cap_v2", prediction_type=prediction, timestep_spacing=spacing, clip_sample=False
    )
    start = img2img_start(steps, strength)
    name, keys = METHOD_CLASSES[method]
    sched = oracle(name, config, **keys)
    rng = np.random.default_rng(steps)
    image = np.clip(rng.standard_normal(SHAPE), -1, 1).astype(np.float32)
    z = rng.standard_normal(SHAPE).astype(np.float32)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(steps + 1)]
    ts, inputs, final = run_oracle(sched, steps, start, image, z, noises, prediction, monkeypatch)
    plan = make_plan(config, steps, method=method, start=start, options=SolverOptions())
    assert np.array_equal(plan.timesteps, ts)
    x_init = np.sqrt(plan.start_abar) * image.astype(np.float64) + np.sqrt(1 - plan.start_abar) * z
    ours_inputs, ours = run_rows(plan.timesteps, plan.coeffs, 1.0, x_init, noises, prediction)
    tol = TOL if method in ("ddim", "ddpm") else tolerance(method, sched)
    for i, (a, b) in enumerate(zip(ours_inputs, inputs)):
        assert rel(a, b) < tol, f"model input of step {i}"
    assert rel(ours, final) < tol


def test_a_start_past_the_last_step_is_refused():
    with pytest.raises(ValueError, match=r"start must be an integer in \[0, 9\]"):
        make_plan(SchedulerConfig(), 10, start=10)
