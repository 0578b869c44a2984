"""SchedulerConfig: diffusers' keys and defaults, betas as diffusers stores them, and clear refusals."""

import dataclasses
import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddengine.core.schedule import SchedulerConfig, SchedulerConfigError  # noqa: E402

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")


def ulps(a, b):
    return int(np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)).max())


def test_defaults_are_diffusers_defaults():
    ours = {f.name: f.default for f in dataclasses.fields(SchedulerConfig)}
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        params = inspect.signature(cls.__init__).parameters
        for name, default in ours.items():
            if name in params:
                assert params[name].default == default, (cls.__name__, name)
    missing = set(ours) - set(inspect.signature(diffusers.DDPMScheduler.__init__).parameters) - {"set_alpha_to_one"}
    assert not missing


@pytest.mark.parametrize("T", [1000, 7, 4000])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_betas_match_diffusers_float32(schedule, T):
    """Within 8 float32 ulps of torch's (linspace/sigmoid rounding differs by CPU vector width); cosine is exact."""
    ours = SchedulerConfig(num_train_timesteps=T, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).betas()
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=T, beta_schedule=schedule, beta_start=0.00085, beta_end=0.012
    ).betas.numpy()
    assert ours.dtype == np.float32 and ours.shape == (T,)
    assert ulps(ours, ref) <= (0 if schedule in ("squaredcos_cap_v2", "laplace") else 8)


def test_alphas_cumprod_float64_close_to_diffusers():
    for schedule in SCHEDULES:
        ours = SchedulerConfig(beta_schedule=schedule).alphas_cumprod()
        ref = diffusers.DDPMScheduler(beta_schedule=schedule).alphas_cumprod.numpy().astype(np.float64)
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, ref, rtol=2e-6, err_msg=schedule)


@pytest.mark.parametrize("schedule", SCHEDULES[:4])
def test_zero_snr_rescale(schedule):
    """Lin et al. Alg. 1: alpha-bar_{T-1} = 0 exactly; close to diffusers' float32 table, equal to its float64 rescale."""
    cfg = SchedulerConfig(beta_schedule=schedule, rescale_betas_zero_snr=True)
    ours = cfg.alphas_cumprod()
    ref = (
        diffusers.DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=True)
        .alphas_cumprod.numpy()
        .astype(np.float64)
    )
    assert ours[-1] == 0.0 and ref[-1] == 0.0 and cfg.betas()[-1] == 1.0
    np.testing.assert_allclose(ours[:-1], ref[:-1], rtol=5e-5)  # diffusers' rescale runs in float32
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    ref64 = rescale_zero_terminal_snr(diffusers.DDPMScheduler(beta_schedule=schedule).betas.double()).float().numpy()
    assert ulps(cfg.betas(), ref64) <= 8


def test_trained_betas_used_verbatim_as_float32():
    betas = list(np.linspace(1e-4, 0.02, 10) ** 1.1)
    cfg = SchedulerConfig(num_train_timesteps=10, trained_betas=betas, beta_schedule="scaled_linear")
    ref = diffusers.DDIMScheduler(num_train_timesteps=10, trained_betas=betas).betas.numpy()
    assert np.array_equal(cfg.betas(), ref)
    assert isinstance(cfg.trained_betas, tuple) and hash(cfg)


# Stable Diffusion 1.x's scheduler/scheduler_config.json, as its pipeline folders ship it.
SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def test_from_dict_reads_a_diffusers_scheduler_config(recwarn):
    sd = SD1_SCHEDULER
    cfg = SchedulerConfig.from_dict(json.loads(json.dumps(sd)))
    assert not [
        w for w in recwarn if issubclass(w.category, UserWarning)
    ]  # unknown keys are reported, not warned about
    assert SchedulerConfig.unused_keys({**sd, "karras_rho": 7}) == ["karras_rho"]  # solver keys and `_` keys are read
    ref = diffusers.DDIMScheduler.from_config(sd)
    for key, value in cfg.to_dict().items():
        if key in ref.config and key != "trained_betas":
            assert ref.config[key] == value, key
    assert ulps(cfg.betas(), ref.betas.numpy()) <= 8


def test_unused_keys_are_the_ones_no_engine_method_reads():
    """A real diffusers DEIS config: every key is a schedule or solver key but the flow-matching knobs."""
    config = dict(diffusers.DEISMultistepScheduler().config)
    assert SchedulerConfig.unused_keys(config) == ["flow_shift", "time_shift_type"]
    assert SchedulerConfig.unused_keys(dict(diffusers.PNDMScheduler(skip_prk_steps=True).config)) == []
    assert (
        SchedulerConfig.unused_keys({"prediction_type": "epsilon", "sample_max_value": 1.0, "_class_name": "X"}) == []
    )


def test_from_dict_ignores_thresholding_knobs_silently(recwarn):
    cfg = SchedulerConfig.from_dict(
        {"_class_name": "DDPMScheduler", "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
    )
    assert cfg == SchedulerConfig()
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize(
    "cls", ["FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler", "ScoreSdeVeScheduler", "LCMScheduler"]
)
def test_foreign_scheduler_classes_are_refused_naming_the_accepted_ones(cls):
    config = {"_class_name": cls, "num_train_timesteps": 1000}
    with pytest.raises(SchedulerConfigError) as err:
        SchedulerConfig.from_dict(config)
    message = str(err.value)
    assert repr(cls) in message and "DDPMScheduler" in message and "DDIMScheduler" in message


def test_a_real_flow_match_config_is_refused():
    """diffusers' own FlowMatchEulerDiscreteScheduler config (its keys would otherwise mostly parse as defaults)."""
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", **diffusers.FlowMatchEulerDiscreteScheduler().config}
    with pytest.raises(SchedulerConfigError, match="FlowMatchEulerDiscreteScheduler.*not supported.*expected one of"):
        SchedulerConfig.from_dict(json.loads(json.dumps(config)))


def test_accepted_classes_are_diffusers_ddpm_compatibles():
    """Every accepted class is one diffusers itself declares compatible with DDPMScheduler and DDIMScheduler's config."""
    from ddengine.core.schedule import COMPATIBLE_CLASSES

    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        assert set(COMPATIBLE_CLASSES) <= {*cls._compatibles, cls.__name__}
    assert {"DDPMScheduler", "DDIMScheduler"} <= set(COMPATIBLE_CLASSES)
    assert "EDMEulerScheduler" not in COMPATIBLE_CLASSES  # EDM's sigmas are not a DDPM beta schedule
    for name in COMPATIBLE_CLASSES:
        SchedulerConfig.from_dict({"_class_name": name})


def test_to_dict_round_trips_through_json():
    cfg = SchedulerConfig(num_train_timesteps=4, trained_betas=[0.1, 0.2, 0.3, 0.4], prediction_type="v_prediction")
    assert SchedulerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "beta_schedule",
            "cosine",
            r"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', 'sigmoid', 'laplace', got 'cosine'",
        ),
        ("prediction_type", "eps", r"prediction_type must be one of 'epsilon', 'v_prediction', 'sample', got 'eps'"),
        (
            "timestep_spacing",
            "karras",
            r"timestep_spacing must be one of 'leading', 'trailing', 'linspace', got 'karras'",
        ),
        (
            "variance_type",
            "tiny",
            r"variance_type must be one of 'fixed_small', 'fixed_small_log', 'fixed_large', got 'tiny'",
        ),
        (
            "variance_type",
            "fixed_large_log",
            r"variance_type 'fixed_large_log' is not supported \(.*NaN\); use one of 'fixed_small'",
        ),
        ("variance_type", "learned", r"variance_type 'learned' is not supported \(.*variance channels\)"),
        ("variance_type", "learned_range", r"variance_type 'learned_range' is not supported"),
        ("thresholding", True, r"thresholding=True \(dynamic thresholding.*per-sample quantile"),
        ("num_train_timesteps", 0, r"num_train_timesteps must be an integer in \[1, 100000\], got 0"),
        ("num_train_timesteps", 10.0, r"num_train_timesteps must be an integer in \[1, 100000\], got 10.0"),
        ("num_train_timesteps", True, r"num_train_timesteps must be an integer in \[1, 100000\], got True"),
        ("steps_offset", -1, r"steps_offset must be an integer >= 0, got -1"),
        ("clip_sample", "yes", r"clip_sample must be true or false, got 'yes'"),
        ("clip_sample_range", 0.0, r"clip_sample_range must be a finite number > 0, got 0.0"),
        ("clip_sample_range", float("inf"), r"clip_sample_range must be a finite number > 0, got inf"),
        ("beta_start", float("nan"), r"beta_start must be a number in \[0.0, 1.0\], got nan"),
        ("beta_end", 2.0, r"beta_end must be a number in \[0.0, 1.0\], got 2.0"),
        ("set_alpha_to_one", 1, r"set_alpha_to_one must be true or false, got 1"),
        ("trained_betas", [0.1, 0.2], r"trained_betas must have num_train_timesteps = 1000 entries, got 2"),
        ("trained_betas", ["a"] * 1000, r"trained_betas must be a list of numbers"),
    ],
)
def test_invalid_values_name_allowed_and_given(key, value, message):
    with pytest.raises(SchedulerConfigError, match=message):
        SchedulerConfig(**{key: value})
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.from_dict({key: value})


def test_zero_beta_refused():
    with pytest.raises(SchedulerConfigError, match=r"betas must lie in \(0, 1\]; beta\[0\] = 0.0"):
        SchedulerConfig(beta_start=0.0)


def test_from_dict_needs_a_dict():
    with pytest.raises(SchedulerConfigError, match="must be a dict, got list"):
        SchedulerConfig.from_dict([1, 2])
