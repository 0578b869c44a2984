"""`ddengine export / train / train-classifier`: the model and its torch twin written, bad input exits 2 with a clear
message and writes nothing."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from ddengine.cli import main  # noqa: E402
from ddengine.export import checkpoint, train  # noqa: E402
from ddengine.nets.unet import UNet  # noqa: E402
from tests.support.export_helpers import randomized, tiny_config  # noqa: E402
from tests.support.specs import read_spec  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    """The raw and the EMA weights of a checkpoint: different, so the export can be told to have taken the EMA ones."""
    cfg = tiny_config()
    return randomized(UNet(cfg), seed=0), randomized(UNet(cfg), seed=1)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, weights):
    path = tmp_path_factory.mktemp("ckpt") / "last.safetensors"
    model, ema = weights
    meta = {
        "model_config": tiny_config().__dict__,
        "train_config": train.TrainConfig().__dict__,
        "step": 7,
        "scheduler": train.scheduler_dict(),
    }
    checkpoint.save(path, model=model, ema=ema, optimizer=torch.optim.AdamW(model.parameters()), meta=meta)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("export") / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out)])
    return out, result


def test_export_writes_a_self_describing_model(exported):
    out, result = exported
    assert result.exit_code == 0, result.output
    assert "max |ORT - torch|" in result.output
    spec = read_spec(out)
    assert (spec.num_classes, spec.null_class, spec.height) == (3, 3, 16)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.safetensors"]  # the twin, and no temp file


def test_the_export_and_its_twin_compute_the_checkpoints_ema_weights(exported, weights):
    from ddengine.nets.twin import load_twin, twin_path
    from ddengine.runtime.sampler import Sampler

    out, _ = exported
    model, ema = weights
    twin = load_twin(twin_path(out))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 16, 16)).astype(np.float32)
    t, y = np.array([0, 500, 999]), np.array([0, 2, 3])
    with torch.no_grad():
        args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
        want, raw, got = ema(*args).numpy(), model(*args).numpy(), twin(*args).numpy()
    assert np.abs(want - raw).max() > 1e-2  # the two weight sets are distinguishable
    np.testing.assert_array_equal(got, want)
    onnx_out = Sampler(out, backend="ort-cpu").backend.run(
        {"sample": x, "timestep": t, "class_labels": y}, np.empty_like(x)
    )
    np.testing.assert_allclose(onnx_out, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "content, message", [(b"\x00" * 100, "not a readable safetensors file"), (None, "does not exist")]
)
def test_export_of_a_bad_checkpoint_exits_2(tmp_path, content, message):
    ckpt = tmp_path / "bad.safetensors"
    if content is not None:
        ckpt.write_bytes(content)
    result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_export_to_a_missing_folder_exits_2(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "no" / "m.onnx")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_export_needs_exactly_one_source(tmp_path, tiny_checkpoint):
    result = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "--diffusers", str(tmp_path), "-o", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == 2 and "exactly one" in result.output


def test_train_without_data_exits_2_naming_the_package(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "-o", str(tmp_path / "run"), "--data", str(tmp_path / "none"), "--max-steps", "1"]
    )
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output


def test_train_classifier_without_data_exits_2(tmp_path):
    result = CliRunner().invoke(
        main, ["train-classifier", "-o", str(tmp_path / "c.onnx"), "--data", str(tmp_path / "none")]
    )
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output
    assert not (tmp_path / "c.onnx").exists()


def test_train_into_an_unwritable_folder_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["train", "-o", str(blocker / "run"), "--max-steps", "1"])
    assert result.exit_code == 2 and "cannot create the checkpoint folder" in result.output


def test_export_of_an_unsupported_diffusers_folder_exits_2(tmp_path):
    import json

    (tmp_path / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DModel", "in_channels": 3, "out_channels": 6})
    )
    (tmp_path / "scheduler_config.json").write_text("{}")
    result = CliRunner().invoke(main, ["export", "--diffusers", str(tmp_path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "out_channels 6 != in_channels 3" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_export_fp16_writes_a_mixed_precision_model(tmp_path, tiny_checkpoint):
    import onnx

    from tests.support.fp16_checks import fp32_ops

    out = tmp_path / "m16.onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--fp16"])
    assert result.exit_code == 0, result.output
    assert "fp16 max |ORT - torch|" in result.output
    model = onnx.load(str(out))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
    assert "Softmax" in fp32_ops(model).values()
    assert read_spec(out).num_classes == 3


@pytest.mark.parametrize(
    "command",
    [["train", "-o", "runs_x"], ["export", "ckpt.safetensors", "-o", "m.onnx"], ["train-classifier", "-o", "c.onnx"]],
)
def test_build_commands_without_torch_name_the_extra(command, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, command)
    assert (
        result.exit_code == 2 and "needs torch" in result.output and "pip install 'ddengine[export]'" in result.output
    )
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_recommended_guidance_goes_into_the_metadata_and_is_what_sampling_uses(tmp_path, tiny_checkpoint):
    from ddengine.runtime.sampler import Sampler

    out = tmp_path / "g.onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--recommended-guidance", "2.5"])
    assert result.exit_code == 0, result.output
    assert read_spec(out).recommended_guidance == 2.5
    sampler = Sampler(str(out), backend="ort-cpu")
    implicit, records = sampler.sample(2, steps=3, seed=4, classes=[1, 2])
    explicit, _ = sampler.sample(2, steps=3, seed=4, classes=[1, 2], guidance=2.5)
    unguided, _ = sampler.sample(2, steps=3, seed=4, classes=[1, 2], guidance=1.0)
    assert records[0]["guidance"] == 2.5
    assert np.array_equal(implicit, explicit) and not np.array_equal(implicit, unguided)


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_recommended_guidance_is_refused_before_any_work(tmp_path, tiny_checkpoint, value):
    out = tmp_path / "g.onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--recommended-guidance", value])
    assert result.exit_code == 2 and "--recommended-guidance" in result.output
    assert not out.exists()


def test_recommended_guidance_on_a_model_without_a_null_class_is_a_clear_error(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(tiny_config(), num_classes=0)
    model = randomized(UNet(cfg), seed=0)
    meta = {
        "model_config": cfg.__dict__,
        "train_config": train.TrainConfig().__dict__,
        "step": 1,
        "scheduler": train.scheduler_dict(),
    }
    checkpoint.save(
        tmp_path / "u.safetensors", model=model, ema=model, optimizer=torch.optim.AdamW(model.parameters()), meta=meta
    )
    out = tmp_path / "exported.onnx"  # not u.onnx: its twin u.safetensors would be the checkpoint
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "u.safetensors"), "-o", str(out), "--recommended-guidance", "2"]
    )
    assert result.exit_code == 2 and "null class" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.safetensors"]


def _scheduler_file(tmp_path, keys):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(keys))
    return path


def test_scheduler_config_changes_how_the_export_samples_and_keeps_what_it_was_trained_with(tmp_path, tiny_checkpoint):
    from diffusers import DDIMScheduler

    from ddengine.core.plan import make_plan

    keys = {
        "_class_name": "DDIMScheduler",
        "clip_sample": True,
        "clip_sample_range": 2.0,
        "timestep_spacing": "trailing",
        "num_train_timesteps": 1000,
    }
    out = tmp_path / "s.onnx"
    result = CliRunner().invoke(
        main,
        ["export", str(tiny_checkpoint), "-o", str(out), "--scheduler-config", str(_scheduler_file(tmp_path, keys))],
    )
    assert result.exit_code == 0, result.output
    sched = read_spec(out).scheduler
    trained = train.scheduler_dict()
    assert {k: sched[k] for k in ("beta_schedule", "num_train_timesteps", "prediction_type")} == {
        k: trained[k] for k in ("beta_schedule", "num_train_timesteps", "prediction_type")
    }
    oracle = DDIMScheduler.from_config(sched)
    oracle.set_timesteps(10)
    plan = make_plan(sched, 10)
    assert plan.clip == 2.0 and list(plan.timesteps) == oracle.timesteps.tolist()


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"beta_schedule": "linear"}, "trained with beta_schedule='squaredcos_cap_v2'"),
        ({"prediction_type": "v_prediction"}, "trained with prediction_type='epsilon'"),
        ({"clip_samples": False}, "unknown scheduler keys clip_samples"),
        ({"clip_sample": "no"}, "clip_sample must be true or false, got 'no'"),
        ([1, 2], "must be a JSON object, got list"),
    ],
)
def test_a_scheduler_config_that_cannot_apply_is_refused_and_writes_nothing(tmp_path, tiny_checkpoint, keys, message):
    out = tmp_path / "s.onnx"
    config = _scheduler_file(tmp_path, keys)
    result = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(out), "--scheduler-config", str(config)]
    )
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name]


def test_a_scheduler_config_that_is_not_json_is_named(tmp_path, tiny_checkpoint):
    config = tmp_path / "scheduler_config.json"
    config.write_text("{clip_sample: false")
    result = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "s.onnx"), "--scheduler-config", str(config)]
    )
    assert result.exit_code == 2 and "--scheduler-config" in result.output and "not valid JSON" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name]


def test_an_export_never_writes_over_its_checkpoint(tmp_path, tiny_checkpoint):
    """`export runs/x/last.safetensors -o runs/x/last.onnx` would put the twin over the checkpoint it read."""
    import shutil

    ckpt = tmp_path / "last.safetensors"
    shutil.copy(tiny_checkpoint, ckpt)
    before = ckpt.read_bytes()
    for out in ("last.onnx", "last.safetensors"):
        result = CliRunner().invoke(main, ["export", str(ckpt), "-o", str(tmp_path / out)])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert ckpt.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    assert f"its torch twin {ckpt} would be written over the input CHECKPOINT {ckpt}" in CliRunner().invoke(
        main, ["export", str(ckpt), "-o", str(tmp_path / "last.onnx")]
    ).output.replace("\n", " ")
