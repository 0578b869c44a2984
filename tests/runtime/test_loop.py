"""HostLoop.denoise against a float64 numpy reference loop: the conv-free tiny model, Philox noise, diffusers-checked steps.

The oracle shares no code with the loop: the model is its float64 numpy twin (tiny_forward64), the noise the
float64 Philox/Box-Muller of tests/support/kernel_oracle.py, each step engine/core/reference.py's unfused float64
evaluation of the plan row (itself checked against diffusers in test_plan_vs_diffusers.py), and guidance the
textbook u + g (c - u) for every g (the loop's shortcuts for g = 0 and g = 1 must agree with it).
"""

import time

import numpy as np
import pytest

from ddengine.backends import create_backend
from ddengine.core.plan import make_plan
from ddengine.core.reference import reference_step
from ddengine.core.rows import SIGMA
from ddengine.model.load import load_model
from ddengine.runtime.loop import HostLoop
from tests.support.conditioning import denoise
from tests.support.kernel_oracle import batch_noise
from tests.support.tiny_models import SCHEDULER, build_tiny_model, tiny_forward64

ATOL = 2e-5


@pytest.fixture(scope="module")
def models(linear_model, tmp_path_factory):
    """The epsilon/clip linear model, and a v-prediction, unclipped, trailing one (3 channels, 2 classes)."""
    path, _ = linear_model
    v_path = tmp_path_factory.mktemp("loop") / "v.onnx"
    build_tiny_model(
        v_path,
        channels=3,
        num_classes=2,
        conv=False,
        scheduler={
            **SCHEDULER,
            "prediction_type": "v_prediction",
            "clip_sample": False,
            "timestep_spacing": "trailing",
            "steps_offset": 0,
        },
    )
    out = {}
    for name, p in (("eps", path), ("v", v_path)):
        model = load_model(p)
        out[name] = (model, HostLoop(create_backend("ort-cpu", model), model.spec))
    return out


def reference_loop(spec, plan, seeds, classes, guidance):
    """x_0 and every x_t of the float64 loop (improved-diffusion's p_sample_loop with CFG)."""
    n = len(seeds)
    shape = (n, *spec.image_shape)
    x = batch_noise(seeds, shape, 0, 1)
    null = np.full(n, spec.null_class)
    steps = []
    for i, t in enumerate(plan.timesteps):
        if classes is None:
            m = tiny_forward64(x, t, null, spec)
        elif guidance is None:
            m = tiny_forward64(x, t, classes, spec)
        else:
            u, c = tiny_forward64(x, t, null, spec), tiny_forward64(x, t, classes, spec)
            m = u + guidance * (c - u)
        z = batch_noise(seeds, shape, i, 0) if plan.coeffs[i, SIGMA] != 0 else None
        x = reference_step(x, m, plan.coeffs[i], z)
        steps.append(x)
    return x, steps


CASES = [
    ("ddim", 0.0, [0, 2, 1], None),
    ("ddim", 0.7, [0, 2, 1], 2.5),
    ("ddpm", 0.0, [1, 1, 0], None),
    ("ddpm", 0.0, [2, 0, 1], 1.5),
    ("ddim", 0.3, [0, 1, 2], 0.0),
    ("ddim", 0.0, [2, 1, 0], 1.0),
    ("ddpm", 0.0, None, None),
]


@pytest.mark.parametrize("name", ["eps", "v"])
@pytest.mark.parametrize("method, eta, classes, guidance", CASES)
def test_host_loop_equals_the_float64_reference_loop(models, name, method, eta, classes, guidance):
    model, loop = models[name]
    spec = model.spec
    if classes is not None:
        classes = np.array(classes) % spec.num_classes
    plan = make_plan(spec.schedule, 6, method=method, eta=eta)
    seeds = np.array([5, 6, 2**63 + 7], np.uint64)
    latents = []
    x, bad = denoise(loop, plan, seeds, classes, guidance, on_step=lambda i, t, x: latents.append((i, t, x.copy())))
    want, steps = reference_loop(spec, plan, seeds, classes, guidance)
    assert [(i, t) for i, t, _ in latents] == list(enumerate(plan.timesteps.tolist()))
    for (i, _, got), ref in zip(latents, steps):
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL, err_msg=f"step {i}")
    assert x.dtype == np.float32 and x.shape == (3, *spec.image_shape)
    np.testing.assert_allclose(x, want, rtol=0, atol=ATOL)
    assert bad.tolist() == [-1, -1, -1]
    assert np.abs(want).max() > 0.1  # a non-trivial result


def test_the_forward_sees_own_rows_then_unconditional_rows(models):
    """Each forward has the documented row layout: [own rows of all images; unconditional rows of the guided ones]."""
    from ddengine.runtime.batch import ImageBatch
    from ddengine.runtime.conditioning import class_conditioning

    model, loop = models["eps"]
    spec = model.spec
    plan = make_plan(spec.schedule, 3)
    classes = np.array([2, 0])
    for guidance, rows in ((3.0, 4), (1.0, 2)):  # g = 1: the conditional model alone, one row each
        batch = ImageBatch(loop.backend, spec, 2)
        batch.admit(plan, np.array([1, 2], np.uint64), class_conditioning(spec, classes, guidance, 2), [0, 1])
        for t in plan.timesteps:
            x = batch.x.astype(np.float64)
            out = batch.forward().copy()
            assert out.shape == (rows, *spec.image_shape)
            np.testing.assert_allclose(out[:2], tiny_forward64(x, t, classes, spec), atol=1e-5)
            if rows == 4:
                uncond = tiny_forward64(x, t, np.full(2, spec.null_class), spec)
                np.testing.assert_allclose(out[2:], uncond, atol=1e-5)
            batch.update()


def test_timers_stay_within_the_wall_time(models):
    model, loop = models["v"]
    plan = make_plan(model.spec.schedule, 20)
    timers = {}
    start = time.perf_counter()
    denoise(loop, plan, np.arange(4, dtype=np.uint64), np.array([0, 1, 0, 1]), 2.0, timers=timers)
    wall = time.perf_counter() - start
    assert timers["forward"] > 0 and timers["step"] > 0
    assert timers["forward"] + timers["step"] <= wall
