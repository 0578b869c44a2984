"""`ddengine export / train / train-classifier`: bad input exits 2 with a clear message and writes nothing."""
import pytest
import torch
from click.testing import CliRunner

from ddengine.cli import main
from ddengine.export import checkpoint, train
from ddengine.export.onnx_export import read_spec
from ddengine.nets.unet import UNet

from export_helpers import randomized, tiny_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "last.safetensors"
    cfg = tiny_config()
    model = randomized(UNet(cfg))
    meta = {"model_config": cfg.__dict__, "train_config": train.TrainConfig().__dict__, "step": 7,
            "scheduler": train.scheduler_dict()}
    checkpoint.save(path, model=model, ema=model, optimizer=torch.optim.AdamW(model.parameters()), meta=meta)
    return path


def test_export_writes_a_self_describing_model(tmp_path, tiny_checkpoint):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "max |ORT - torch|" in result.output
    spec = read_spec(out)
    assert (spec.num_classes, spec.null_class, spec.height) == (3, 3, 16)


@pytest.mark.parametrize("content, message", [(b"\x00" * 100, "not a readable safetensors file"), (None, "does not exist")])
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
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "--diffusers", str(tmp_path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "exactly one" in result.output


def test_train_without_data_exits_2_naming_the_package(tmp_path):
    result = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "run"), "--data", str(tmp_path / "none"), "--max-steps", "1"])
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output


def test_train_classifier_without_data_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["train-classifier", "-o", str(tmp_path / "c.onnx"), "--data", str(tmp_path / "none")])
    assert result.exit_code == 2 and "apt-get install dataset-fashion-mnist" in result.output
    assert not (tmp_path / "c.onnx").exists()


def test_train_into_an_unwritable_folder_exits_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = CliRunner().invoke(main, ["train", "-o", str(blocker / "run"), "--max-steps", "1"])
    assert result.exit_code == 2 and "cannot create the checkpoint folder" in result.output


def test_export_of_an_unsupported_diffusers_folder_exits_2(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "in_channels": 3, "out_channels": 6}))
    (tmp_path / "scheduler_config.json").write_text("{}")
    result = CliRunner().invoke(main, ["export", "--diffusers", str(tmp_path), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 2 and "out_channels 6 != in_channels 3" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_export_fp16_writes_a_mixed_precision_model(tmp_path, tiny_checkpoint):
    import onnx

    from ddengine.export.fp16 import fp32_ops

    out = tmp_path / "m16.onnx"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--fp16"])
    assert result.exit_code == 0, result.output
    assert "fp16 max |ORT - torch|" in result.output
    model = onnx.load(str(out))
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
    assert "Softmax" in fp32_ops(model).values()
    assert read_spec(out).num_classes == 3
