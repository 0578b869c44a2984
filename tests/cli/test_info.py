"""`ddengine info`: the spec, the tensors bound from the graph, the schedule (checked against diffusers) and the backends."""

import json
import re
import shutil

import pytest
from click.testing import CliRunner

from ddengine.cli import main
from ddengine.model.load import default_model_path
from tests.support.tiny_models import SCHEDULER, build_tiny_model
from tests.support.tiny_pipeline import tiny_sd  # noqa: F401  (the fixture)
from tests.text.broken_folders import BROKEN


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_info_prints_spec_io_and_schedule(cond_model):
    result = run("info", cond_model, "--steps", 10)
    assert result.exit_code == 0, result.output
    assert "3x8x8" in result.output and "4 classes, null class 4" in result.output
    for role, dtype, shape in (
        ("sample", "float32", "[-1, 3, 8, 8]"),
        ("timestep", "int64", "[-1]"),
        ("class_labels", "int64", "[-1]"),
        ("out", "float32", "[-1, 3, 8, 8]"),
    ):
        assert re.search(rf"io\s+{role}\s+'{role}' {dtype} {re.escape(shape)}", result.output), role


def test_info_timesteps_and_coefficients_are_diffusers(cond_model):
    diffusers = pytest.importorskip("diffusers")
    result = run("info", cond_model, "--steps", 10)
    sched = diffusers.DDIMScheduler(**SCHEDULER)
    sched.set_timesteps(10)
    assert f"timesteps {sched.timesteps.tolist()}" in result.output
    t = int(sched.timesteps[0])
    ax = float(1 / sched.alphas_cumprod[t].double().sqrt())  # epsilon prediction: x0 = x / sqrt(abar) - ...
    assert re.search(rf"step 0\s+┃[^\n]*\n[^\n]*t={t}\s", result.output)  # the first value column is step 0
    row = re.search(r"│ ax\s+│ x0 = ax\*x \+ am\*m: weight of x\s+│ ([\d.e+-]+)", result.output)
    assert row and float(row.group(1)) == pytest.approx(ax, rel=1e-5)


def test_info_explains_each_column_it_shows_and_leaves_out_unread_keys(tmp_path, uncond_model):
    from ddengine.core.rows import COLUMNS

    cosine = tmp_path / "cosine.json"
    cosine.write_text(json.dumps({**SCHEDULER, "beta_schedule": "squaredcos_cap_v2", "clip_sample": False}))
    shown = run("info", uncond_model, "--scheduler-config", cosine, "--steps", 4, "--method", "dpmpp-2m").output
    columns = re.findall(r"^│ (\w+)\s+│ (.+?)\s+│", shown, re.M)
    assert {"ax", "am", "q0", "write_d"} <= {name for name, _ in columns} <= set(COLUMNS)
    assert all(meaning and meaning != name for name, meaning in columns)
    scheduler = shown[shown.index("scheduler") : shown.index("plan ")]
    assert "beta_schedule = squaredcos_cap_v2" in scheduler  # diffusers' betas_for_alpha_bar reads no beta_start/end
    assert "beta_start" not in scheduler and "beta_end" not in scheduler and "clip_sample_range" not in scheduler
    assert "clip" not in shown[shown.index("plan ") :].splitlines()[0]  # the plan line does not repeat it
    linear = run("info", uncond_model, "--steps", 4).output
    assert "beta_start = " in linear and "beta_end = " in linear


def test_info_shows_the_configs_solver_and_names_the_keys_no_method_reads(tmp_path, uncond_model):
    config = tmp_path / "scheduler_config.json"
    keys = {"_class_name": "PNDMScheduler", **SCHEDULER, "skip_prk_steps": True, "flow_shift": 3.0}
    config.write_text(json.dumps(keys))
    result = run("info", uncond_model, "--scheduler-config", config, "--steps", 3)
    assert result.exit_code == 0, result.output
    assert "(not read by any method: flow_shift)" in result.output
    assert "plan    plms, 4 steps" in result.output  # PNDM with skip_prk_steps is PLMS: n + 1 model evaluations


def test_info_says_which_backend_auto_picks_here(cond_model):
    from ddengine.backends import auto_choice, available_backends

    result = run("info", cond_model, "--steps", 3)
    choice = auto_choice()
    assert f"available here: {', '.join(available_backends())}" in result.output
    assert f"auto     {choice.name} ({choice.precision})" in result.output


def test_info_on_a_model_without_null_class(tmp_path):
    """A conditional model without a null class needs classes to sample; info still shows its schedule."""
    from ddengine.model.spec import ModelSpec

    spec = ModelSpec(scheduler=dict(SCHEDULER), channels=1, height=8, width=8, num_classes=3)
    build_tiny_model(tmp_path / "m.onnx", num_classes=3, spec=spec)
    result = run("info", tmp_path / "m.onnx", "--steps", 4)
    assert result.exit_code == 0, result.output
    assert "3 classes, null class None" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", 0], "steps must be >= 1, got 0"),
        (["--method", "ddpm", "--eta", 1], "eta applies to method 'ddim' only"),
    ],
)
def test_info_bad_parameters_exit_2(cond_model, args, message):
    result = run("info", cond_model, *args)
    assert result.exit_code == 2 and message in result.output


def test_info_of_a_bad_model_exits_2(tmp_path):
    build_tiny_model(tmp_path / "bad.onnx", meta={"value_range": [1, 1]})
    result = run("info", tmp_path / "bad.onnx")
    assert (
        result.exit_code == 2
        and "value_range must be two finite numbers" in result.output
        and "Traceback" not in result.output
    )


@pytest.mark.parametrize("case", BROKEN)
def test_info_of_a_model_dir_its_graphs_disagree_with_exits_2_as_sample_does(tiny_sd, tmp_path, case):
    """info binds pipeline.json to the graphs as `sample` does (engine/text/pipeline.py read_text_model)."""
    damage, message = BROKEN[case]
    model = shutil.copytree(tiny_sd.model, tmp_path / "model")
    damage(model)
    result = run("info", model)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {message}" and "Traceback" not in result.output


def test_info_defaults_to_the_shipped_model():
    result = run("info", "--steps", 5)
    assert result.exit_code == 0, result.output
    assert str(default_model_path()) in result.output and "10 classes, null class 10" in result.output
