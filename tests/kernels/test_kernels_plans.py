"""The fused step on real DDPM/DDIM coefficient rows (engine/core/plan.py), every step, against the float64 reference."""

import numpy as np
import pytest

from ddengine.core.plan import make_plan
from ddengine.core.reference import reference_step
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
        ref = reference_step(x, m, row.astype(np.float64), batch_noise(seeds, x.shape, i, 0), clip=plan.clip)
        _step.step(x, m, table, images, clip=plan.clip or 0.0)
        images["row"] += 1
        images["step"] += 1
        assert rel_err(x, ref) < 1e-6, (i, int(plan.timesteps[i]))
        x = ref.astype(np.float32)
