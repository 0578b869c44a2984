"""The fused step on real coefficient rows (engine/core/plan.py, engine/core/solvers/), every step, against the
float64 reference, slots included."""

import numpy as np
import pytest

from ddengine.core.plan import METHODS, make_plan
from ddengine.core.reference import reference_step
from ddengine.core.rows import SLOTS
from ddengine.kernels import _step
from ddengine.kernels.host import image_records
from tests.support.kernel_oracle import batch_noise, rel_err


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "method, eta, steps", [("ddpm", 0.0, 1000), ("ddim", 0.0, 50), ("ddim", 0.5, 50), ("ddim", 1.0, 50)]
)
@pytest.mark.parametrize("clip_sample", [False, True])
def test_every_step_of_a_plan_matches_reference(prediction_type, method, eta, steps, clip_sample):
    if method == "ddpm" and prediction_type != "epsilon":
        steps = 100  # the 1000-step walk once is enough for the first and last timesteps
    plan = make_plan(
        {"num_train_timesteps": 1000, "prediction_type": prediction_type, "clip_sample": clip_sample},
        steps,
        method=method,
        eta=eta,
    )
    rng = np.random.default_rng(steps)
    seeds = np.array([3, 2**40 + 4], np.uint64)
    x = rng.standard_normal((2, 3, 7, 5)).astype(np.float32)
    table, images = plan.rows_float32(), image_records(seeds)
    for i, row in enumerate(table):
        m = rng.standard_normal(x.shape).astype(np.float32)
        ref = reference_step(x, m, row.astype(np.float64), batch_noise(seeds, x.shape, i, 0))
        _step.step(x, m, table, images)
        images["row"] += 1
        images["step"] += 1
        assert rel_err(x, ref) < 1e-6, (i, int(plan.timesteps[i]))
        x = ref.astype(np.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("ddim", "ddpm")])
@pytest.mark.parametrize("steps", [4, 20])
def test_every_step_of_a_solver_plan_matches_reference(method, prediction_type, steps):
    plan = make_plan({"num_train_timesteps": 1000, "prediction_type": prediction_type}, steps, method=method)
    rng = np.random.default_rng([steps, len(method)])
    seeds = np.array([3, 2**40 + 4], np.uint64)
    x = rng.standard_normal((2, 3, 7, 5)).astype(np.float32)
    slots = np.zeros((2, SLOTS, 3, 7, 5), np.float32)
    ref_slots = np.zeros((SLOTS, 2, 3, 7, 5))
    table, images = plan.rows_float32(), image_records(seeds)
    for i, row in enumerate(table):
        m = rng.standard_normal(x.shape).astype(np.float32)
        ref = reference_step(x, m, row.astype(np.float64), batch_noise(seeds, x.shape, i, 0), slots=ref_slots)
        _step.step(x, m, table, images, slots=slots)
        images["row"] += 1
        images["step"] += 1
        assert rel_err(x, ref) < 1e-5, (i, plan.timesteps[i])
        assert rel_err(slots.swapaxes(0, 1), ref_slots) < 1e-5, i
        x, slots = ref.astype(np.float32), np.ascontiguousarray(ref_slots.swapaxes(0, 1), dtype=np.float32)
