"""A scheduler config's `_class_name` and keys select a method and its SolverOptions, as diffusers' own configs of
each class spell them (the oracle: configs diffusers writes), and anything else is refused by name."""

import json

import diffusers
import numpy as np
import pytest

from ddengine.core.schedule import SchedulerConfigError, with_sampling_overrides
from ddengine.core.solvers import SolverOptions
from ddengine.core.solvers.classes import METHOD_CLASSES, class_method, solver_options
from ddengine.model.load import load_model
from ddengine.runtime.params import SamplingParams
from ddengine.runtime.parts import step_plan
from tests.support.tiny_models import build_tiny_model


def diffusers_config(name, **keys):
    """The scheduler_config.json diffusers itself writes for a scheduler class (save_config's JSON)."""
    return json.loads(getattr(diffusers, name)(**keys).to_json_string())


@pytest.mark.parametrize("method", list(METHOD_CLASSES))
def test_each_diffusers_class_selects_its_method(method):
    name, keys = METHOD_CLASSES[method]
    want = None if method in ("ddim", "ddpm") else method  # DDPM/DDIM configs leave the method to the request
    assert class_method(diffusers_config(name, **keys)) == want


@pytest.mark.parametrize(
    "name, keys, message",
    [
        ("PNDMScheduler", {}, "PNDMScheduler with skip_prk_steps=False is not one of the engine's solvers"),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver++'"),
        (
            "DPMSolverMultistepScheduler",
            {"solver_order": 1},
            "dpmpp-3m is algorithm_type='dpmsolver++', solver_order=3",
        ),
        ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, "solver_type='heun' is not supported"),
        ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "use_lu_lambdas=True is not supported"),
        (
            "UniPCMultistepScheduler",
            {"solver_type": "bh1"},
            "UniPCMultistepScheduler with solver_order=2, solver_type='bh1'",
        ),
        ("UniPCMultistepScheduler", {"predict_x0": False}, "predict_x0=False is not supported"),
        ("EulerDiscreteScheduler", {"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
        ("HeunDiscreteScheduler", {}, "scheduler class 'HeunDiscreteScheduler' has no engine solver"),
    ],
)
def test_other_classes_and_keys_are_refused_by_name(name, keys, message):
    with pytest.raises(SchedulerConfigError) as err:
        class_method(diffusers_config(name, **keys))
    assert message in str(err.value)


@pytest.mark.parametrize("method", list(METHOD_CLASSES))
def test_a_whole_diffusers_config_of_each_class_loads_with_its_spacing(tmp_path, method):
    name, keys = METHOD_CLASSES[method]
    build_tiny_model(tmp_path / "m.onnx")
    spec = load_model(tmp_path / "m.onnx", scheduler_config=diffusers_config(name, **keys)).spec
    assert spec.scheduler_method == (None if method in ("ddim", "ddpm") else method)
    assert spec.schedule.timestep_spacing == getattr(diffusers, name)().config.timestep_spacing
    sparse = {"_class_name": name, "num_train_timesteps": 1000, "beta_schedule": "linear", **keys}
    spec = load_model(tmp_path / "m.onnx", scheduler_config=sparse).spec  # the class's defaults fill the rest
    oracle = getattr(diffusers, name).from_config(sparse).config
    assert (spec.schedule.timestep_spacing, spec.schedule.set_alpha_to_one) == (
        oracle.timestep_spacing,
        oracle.get("set_alpha_to_one", True),
    )


def test_solver_options_read_diffusers_keys():
    config = diffusers_config(
        "DPMSolverMultistepScheduler", use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False
    )
    assert solver_options(config) == SolverOptions(
        use_karras_sigmas=True, final_sigmas_type="sigma_min", lower_order_final=False, euler_at_final=False
    )
    assert solver_options({}) == SolverOptions()
    with pytest.raises(SchedulerConfigError, match="final_sigmas_type must be one of 'zero', 'sigma_min', got 'max'"):
        solver_options({"final_sigmas_type": "max"})


def test_a_partial_override_keeps_the_trained_schedule_and_adds_the_class():
    trained = diffusers_config("DDPMScheduler", beta_schedule="squaredcos_cap_v2", clip_sample=False)
    merged = with_sampling_overrides(trained, {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True})
    assert merged["beta_schedule"] == "squaredcos_cap_v2" and merged["timestep_spacing"] == "leading"
    assert class_method(merged) == "euler" and solver_options(merged).use_karras_sigmas


def test_a_model_samples_with_its_configs_solver_as_diffusers_sets_its_timesteps(tmp_path):
    """A --scheduler-config naming DPMSolverMultistepScheduler with Karras sigmas: the request's default method is
    dpmpp-2m and its timesteps are the ones diffusers' class computes from the same config."""
    build_tiny_model(tmp_path / "m.onnx", num_classes=2)
    override = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    spec = load_model(tmp_path / "m.onnx", scheduler_config=override).spec
    request = SamplingParams.build(n=1, steps=12, classes=0).bind(spec)
    assert request.method == "dpmpp-2m"
    oracle = diffusers.DPMSolverMultistepScheduler.from_config(spec.scheduler)
    oracle.set_timesteps(12)
    assert np.array_equal(step_plan(spec, request).timesteps, oracle.timesteps.numpy())
    assert SamplingParams.build(n=1, method="ddim", classes=0).bind(spec).method == "ddim"  # the request wins
