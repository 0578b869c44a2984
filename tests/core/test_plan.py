"""make_plan / StepPlan: the table's shape and dtypes, and clear refusals of bad input."""

import math

import numpy as np
import pytest

from ddengine.core.plan import StepPlan, make_plan
from ddengine.core.rows import NUM_COLUMNS, SIGMA
from ddengine.core.schedule import SchedulerConfig


def test_plan_table_types_and_float32_rows():
    plan = make_plan(SchedulerConfig(), 50, method="ddim", eta=0.5)
    assert len(plan) == 50 and plan.timesteps.dtype == np.int64 and plan.coeffs.shape == (50, NUM_COLUMNS)
    assert plan.coeffs.dtype == np.float64 and plan.method == "ddim" and plan.eta == 0.5 and plan.clip == 1.0
    rows = plan.rows_float32()
    assert rows.dtype == np.float32 and rows.flags.c_contiguous and rows.shape == (50, NUM_COLUMNS)
    assert np.array_equal(rows, plan.coeffs.astype(np.float32))
    with pytest.raises(ValueError):
        plan.coeffs[0, 0] = 1.0  # read-only
    with pytest.raises(AttributeError):
        plan.eta = 1.0  # frozen


def test_clip_off_and_range():
    assert make_plan(SchedulerConfig(clip_sample=False), 10).clip is None
    assert make_plan(SchedulerConfig(clip_sample_range=2.5), 10, method="ddpm").clip == 2.5


def test_dict_config_accepted():
    a = make_plan({"prediction_type": "v_prediction", "_class_name": "DDIMScheduler"}, 20)
    b = make_plan(SchedulerConfig(prediction_type="v_prediction"), 20)
    assert np.array_equal(a.coeffs, b.coeffs) and np.array_equal(a.timesteps, b.timesteps)


def test_ddim_sigma_closed_form():
    """DDIM eq. 16 at eta=1 for leading n=10, computed here from the raw betas (independent of plan.py)."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32).astype(np.float64)
    abar = np.cumprod(1 - betas)
    plan = make_plan(SchedulerConfig(), 10, eta=1.0)
    for row, t in zip(plan.coeffs, plan.timesteps):
        ap = abar[t - 100] if t >= 100 else 1.0
        assert row[SIGMA] == pytest.approx(math.sqrt((1 - ap) / (1 - abar[t]) * (1 - abar[t] / ap)), rel=1e-6)


def test_all_rows_finite_over_configs():
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"):
        for zero_snr, pred in ((False, "epsilon"), (True, "v_prediction"), (True, "sample")):
            for spacing in ("leading", "trailing", "linspace"):
                cfg = SchedulerConfig(
                    beta_schedule=schedule,
                    rescale_betas_zero_snr=zero_snr,
                    prediction_type=pred,
                    timestep_spacing=spacing,
                )
                for n in (1, 2, 3, 999, 1000):
                    for plan in (
                        make_plan(cfg, n, eta=1.0, use_clipped_model_output=True),
                        make_plan(cfg, n, method="ddpm"),
                    ):
                        assert np.isfinite(plan.coeffs).all(), (schedule, zero_snr, pred, spacing, n, plan.method)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True, "50"])
def test_bad_steps(steps):
    with pytest.raises(
        ValueError, match=r"steps must be an integer in \[1, 1000\].*got " + repr(steps).replace(".", r"\.")
    ):
        make_plan(SchedulerConfig(), steps)


@pytest.mark.parametrize("eta", [-0.1, float("nan"), float("inf"), "1", None, True])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0, got"):
        make_plan(SchedulerConfig(), 10, eta=eta)


def test_eta_above_one_that_would_give_nan_refused():
    with pytest.raises(ValueError, match=r"eta=3.0 is too large at timestep .*use eta <= 1"):
        make_plan(SchedulerConfig(), 10, eta=3.0)


def test_methods_are_ddim_ddpm_and_the_registered_solvers():
    from ddengine.core.plan import METHODS
    from ddengine.core.solvers import SOLVERS

    assert set(METHODS) == {"ddim", "ddpm", *SOLVERS}


def test_refusals():
    cfg = SchedulerConfig()
    with pytest.raises(ValueError, match=r"method must be one of 'ddim', 'ddpm', 'dpmpp-2m', .*'plms', got 'heun'"):
        make_plan(cfg, 10, method="heun")
    with pytest.raises(ValueError, match=r"eta applies to method 'ddim' only; method 'euler-a' needs eta=0"):
        make_plan(cfg, 10, method="euler-a", eta=0.5)
    with pytest.raises(ValueError, match=r"eta applies to method 'ddim' only.*got 0.5"):
        make_plan(cfg, 10, method="ddpm", eta=0.5)
    with pytest.raises(ValueError, match=r"exactly one of steps or timesteps, got steps=None, timesteps=None"):
        make_plan(cfg)
    with pytest.raises(ValueError, match=r"exactly one of steps or timesteps, got steps=3"):
        make_plan(cfg, 3, method="ddpm", timesteps=[2, 1, 0])
    with pytest.raises(ValueError, match=r"explicit timesteps are supported for method 'ddpm' only, got method 'ddim'"):
        make_plan(cfg, timesteps=[2, 1, 0])
    with pytest.raises(ValueError, match=r"strictly descending"):
        make_plan(cfg, method="ddpm", timesteps=[1, 2])
    with pytest.raises(ValueError, match=r"use_clipped_model_output must be True or False, got 'yes'"):
        make_plan(cfg, 10, use_clipped_model_output="yes")
    with pytest.raises(TypeError, match=r"config must be a SchedulerConfig or a scheduler config dict, got str"):
        make_plan("linear", 10)
    with pytest.raises(ValueError, match=r"thresholding=True"):
        make_plan({"thresholding": True}, 10)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_zero_snr_epsilon_refused_where_x0_is_infinite(method, spacing):
    cfg = SchedulerConfig(rescale_betas_zero_snr=True, timestep_spacing=spacing)
    with pytest.raises(
        ValueError, match=r"prediction_type 'epsilon' cannot give x0 at timestep 999 where alphas_cumprod = 0"
    ):
        make_plan(cfg, 50, method=method)


def test_step_plan_validates_shapes():
    with pytest.raises(ValueError, match=r"coeffs must have shape \(2, 25\) for 2 timesteps, got \(2, 8\)"):
        StepPlan(timesteps=[2, 1], coeffs=np.zeros((2, 8)), clip=None, method="ddim", eta=0.0)


def test_trailing_rounding_quirk_refused():
    """diffusers' trailing spacing yields 8 timesteps ending at -1 for T=17, n=7 (np.arange float rounding)."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=17, timestep_spacing="trailing")
    sched.set_timesteps(7)
    assert sched.timesteps.tolist()[-1] == -1
    with pytest.raises(ValueError, match=r"timestep -1 is outside the trained range \[0, 16\].*gives 8 timesteps"):
        make_plan(SchedulerConfig(num_train_timesteps=17, timestep_spacing="trailing"), 7)
