"""`ddengine bench` and its library on a tiny model (a few steps): rows, JSON, breakdown, baselines."""
import importlib.util
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddengine.bench import (FLOOR, FUSED, TORCH_UNAVAILABLE, Row, diffusers_runner, engine_runner, load_torch_model, measure,
                            run_benchmarks, summary, twin_error)
from ddengine.cli import main
from ddengine.sampler import Sampler


def test_bench_json_has_every_configuration(tmp_path, cond_model):
    path = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--model", str(cond_model), "--batch", "1", "--batch", "3", "--steps", "3",
                                       "--repeats", "1", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    names = [(r["batch"], r["name"]) for r in data["rows"]]
    for batch in (1, 3):
        for name in ("ddengine fused", "floor: bare forward x steps", "ORT + numpy step (unfused)",
                     "diffusers + torch fp32", "diffusers + torch bf16"):
            assert (batch, name) in names
    fused = next(r for r in data["rows"] if r["name"] == "ddengine fused" and r["batch"] == 3)
    assert fused["seconds"] > 0 and fused["forward_s"] > 0 and fused["step_s"] > 0
    assert fused["forward_s"] + fused["step_s"] <= fused["seconds"]
    assert fused["images_per_s"] == pytest.approx(3 / fused["seconds"])
    assert set(data["summary"]) == {"1", "3"} and data["summary"]["3"]["fused_over_floor"] > 0


def test_bench_rejects_bad_input_before_measuring(tmp_path, cond_model):
    result = CliRunner().invoke(main, ["bench", "--model", str(cond_model), "--batch", "0"])
    assert result.exit_code == 2 and "n must be >= 1, got 0" in result.output
    result = CliRunner().invoke(main, ["bench", "--model", str(cond_model), "--steps", "0"])
    assert result.exit_code == 2 and "steps must be in [1, 1000], got 0" in result.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed here")
def test_plot_without_matplotlib_is_a_clear_usage_error(tmp_path, cond_model):
    result = CliRunner().invoke(main, ["bench", "--model", str(cond_model), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 2 and "--plot needs matplotlib" in result.output


def test_engine_breakdown_adds_up(uncond_model):
    sampler = Sampler(uncond_model)
    request = sampler.request(4, 5, batch_size=4)
    row = measure({FUSED: engine_runner(sampler, request)}, request, repeats=2)[0]
    assert len(row.runs) == 2 and row.seconds in row.runs  # the run closest to the median
    assert row.forward_s + row.step_s + row.other_s == pytest.approx(row.seconds)
    assert summary([row, Row(FLOOR, 4, 5, row.seconds / 2)])["4"]["fused_over_floor"] == pytest.approx(2)


def _tiny_torch_net(gain):
    import torch
    from tiny_models import T_SCALE, class_table, conv_weight

    class TinyNet(torch.nn.Module):
        """The torch twin of the conditional tiny ONNX model (tests/engine/tiny_models.py)."""

        def __init__(self):
            super().__init__()
            self.w = torch.from_numpy(conv_weight(3))
            self.emb = torch.from_numpy(class_table(4, 3))

        def forward(self, sample, timestep, class_labels):
            h = torch.nn.functional.conv2d(sample, self.w.to(sample.dtype), padding=1) * gain
            return h + (timestep.float() * T_SCALE / 1000).view(-1, 1, 1, 1) + self.emb[class_labels].view(-1, 3, 1, 1)

    return TinyNet()


def test_diffusers_baseline_runs_a_torch_twin_of_the_tiny_model(cond_model):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tiny_models import GAIN

    sampler = Sampler(cond_model)
    assert twin_error(_tiny_torch_net(GAIN), sampler) < 1e-5  # the twin is the same function ...
    assert twin_error(_tiny_torch_net(GAIN * 1.5), sampler) > 1e-3  # ... and the check can tell when it is not
    request = sampler.request(2, 3, classes=[0, 1], guidance=2.0, batch_size=2)
    for precision in ("fp32", "bf16"):
        row = measure({precision: diffusers_runner(_tiny_torch_net(GAIN), sampler, request, precision)}, request, repeats=1)[0]
        assert row.seconds > 0 and 0 < row.forward_s < row.seconds


def test_torch_model_unavailable_is_a_reason_not_a_crash(tmp_path, cond_model):
    pytest.importorskip("torch")
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    net, why = load_torch_model(Sampler(cond_model), tmp_path / "ckpt.pt")
    assert net is None and why.startswith(TORCH_UNAVAILABLE)


def test_run_benchmarks_without_baselines(uncond_model):
    rows = run_benchmarks(Sampler(uncond_model), [2], steps=2, repeats=1, baselines=False)
    assert [r.name for r in rows] == ["ddengine fused", "floor: bare forward x steps"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_torch_twin_from_a_project_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    import onnx
    from onnx import helper

    from ddengine.export.onnx_export import load_checkpoint_module
    from ddengine.export.train import TrainConfig, build, save
    from ddengine.nets.unet import UNetConfig
    from ddengine.spec import METADATA_KEY

    model_cfg = UNetConfig(base_channels=8, channel_mult=(1, 2), image_size=8, groups=4, head_channels=8, num_classes=3)
    model, ema, opt = build(model_cfg, TrainConfig())
    torch.nn.init.normal_(ema.conv_out.weight, std=0.1)  # the zero-initialised output layer would hide any mismatch
    save(tmp_path / "last.safetensors", model_cfg, TrainConfig(), model, ema, opt, 0, 1.0)
    module, spec = load_checkpoint_module(tmp_path / "last.safetensors")
    args = (torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 1]))
    names = ["sample", "timestep", "class_labels"]
    torch.onnx.export(module, args, str(tmp_path / "m.onnx"), input_names=names, output_names=["out"], opset_version=17,
                      dynamic_axes={n: {0: "N"} for n in names + ["out"]}, dynamo=False)  # the quick exporter is enough here
    proto = onnx.load(str(tmp_path / "m.onnx"))
    helper.set_model_props(proto, {METADATA_KEY: spec.to_json()})
    onnx.save(proto, str(tmp_path / "m.onnx"))
    sampler = Sampler(tmp_path / "m.onnx")
    net, why = load_torch_model(sampler, tmp_path / "last.safetensors")
    assert net is not None and why == ""
    torch.nn.init.normal_(ema.conv_out.weight, std=0.1)  # another model: the twin check must refuse it
    save(tmp_path / "other.safetensors", model_cfg, TrainConfig(), model, ema, opt, 0, 1.0)
    net, why = load_torch_model(sampler, tmp_path / "other.safetensors")
    assert net is None and "differs from m.onnx" in why
