"""`ddengine sample` and `ddengine info` end to end: files, manifest, exit codes, and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddengine.cli import main
from ddengine.sampler import Sampler


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_sample_writes_images_manifest_grid_and_strips(tmp_path, cond_model):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    result = run("sample", "--model", cond_model, "--n", 5, "--steps", 4, "--batch-size", 2, "--seed", 3,
                 "--class", "all", "--guidance", 2.0, "--out", out, "--grid", grid, "--trajectory", 2, "--quiet")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(r["file"], r["seed"], r["class"], r["status"]) for r in records] == [
        (f"{i:05d}.png", 3 + i, i % 4, "ok") for i in range(5)]
    assert records[0]["steps"] == 4 and records[0]["guidance"] == 2.0 and records[0]["method"] == "ddim"
    assert len(records[0]["model_sha256"]) == 64 and records[0]["ddengine_version"]
    api, _ = Sampler(cond_model).sample(5, steps=4, seed=3, classes=[0, 1, 2, 3, 0], guidance=2.0)
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}.png")), api[i])
        assert (out / f"{i:05d}_trajectory.png").exists()
    assert Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_sample_npy_format(tmp_path, uncond_model):
    result = run("sample", "--model", uncond_model, "--n", 2, "--steps", 2, "--format", "npy", "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "00001.npy").shape == (8, 8, 1)


def test_nan_images_exit_1_and_the_others_are_written(tmp_path, nan_model):
    result = run("sample", "--model", nan_model, "--n", 4, "--steps", 3, "--class", 1, "--class", 2, "--out", tmp_path, "--quiet")
    assert result.exit_code == 1
    assert "2 of 4 images failed" in result.output
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [(r["status"], r["file"]) for r in records] == [("ok", "00000.png"), ("error", None), ("ok", "00002.png"), ("error", None)]
    assert "non-finite" in records[1]["error"]
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00002.png", "manifest.jsonl"]


BAD_INPUTS = [
    (["--steps", 0], "steps must be in [1, 1000], got 0"),
    (["--steps", 1001], "steps must be in [1, 1000], got 1001"),
    (["--steps", "abc"], "'abc' is not a valid integer"),
    (["--n", 0], "n must be >= 1, got 0"),
    (["--batch-size", 0], "batch_size must be >= 1, got 0"),
    (["--guidance", -1, "--class", 1], "guidance must be a finite number >= 0, got -1.0"),
    (["--guidance", "nan", "--class", 1], "guidance must be a finite number >= 0, got nan"),
    (["--eta", "nan"], "eta must be a finite number >= 0, got nan"),
    (["--eta", -0.5], "eta must be a finite number >= 0, got -0.5"),
    (["--class", 9], "class must be in [0, 3], got 9"),
    (["--class", "shoe"], "expected integers or 'all'"),
    (["--method", "euler"], "'euler' is not one of 'ddim', 'ddpm'"),
    (["--threads", 0], "threads must be >= 1, got 0"),
    (["--backend", "tpu"], "unknown backend 'tpu'; expected one of auto, ort-cpu"),
    (["--seed", -1], "seed must be in [0, 18446744073709551600], got -1"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, cond_model, args, message):
    out = tmp_path / "out"
    result = run("sample", "--model", cond_model, "--out", out, "--quiet", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


@pytest.mark.parametrize("setup,message", [
    (lambda d: None, "does not exist"),
    (lambda d: (d / "m.onnx").write_bytes(b"garbage!"), "not a valid ONNX"),
])
def test_missing_or_corrupt_model_exits_2(tmp_path, setup, message):
    setup(tmp_path)
    result = run("sample", "--model", tmp_path / "m.onnx", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_model_without_metadata_needs_scheduler_config(tmp_path):
    from tiny_models import SCHEDULER, build_tiny_model

    build_tiny_model(tmp_path / "plain.onnx", metadata=False)
    result = run("sample", "--model", tmp_path / "plain.onnx", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "--scheduler-config" in result.output and not (tmp_path / "out").exists()
    (tmp_path / "s.json").write_text(json.dumps(SCHEDULER))
    result = run("sample", "--model", tmp_path / "plain.onnx", "--scheduler-config", tmp_path / "s.json",
                 "--n", 1, "--steps", 2, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output


def test_conditional_request_on_unconditional_model_exits_2(tmp_path, uncond_model):
    for args in (["--class", 1], ["--class", "all"], ["--guidance", 3]):
        result = run("sample", "--model", uncond_model, "--out", tmp_path / "out", "--quiet", *args)
        assert result.exit_code == 2 and "unconditional" in result.output, args
    assert not (tmp_path / "out").exists()


def test_unwritable_out_fails_before_sampling(tmp_path, uncond_model, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(Sampler, "run", lambda *a, **k: pytest.fail("sampled before checking --out"))
    result = run("sample", "--model", uncond_model, "--out", tmp_path / "file" / "out", "--quiet")
    assert result.exit_code == 2 and "not writable" in result.output


def test_info_prints_spec_and_schedule(cond_model):
    result = run("info", cond_model, "--steps", 10)
    assert result.exit_code == 0, result.output
    assert "3x8x8" in result.output and "4 classes, null class 4" in result.output
    assert "[901, 801, 701, 601, 501, 401, 301, 201, 101, 1]" in result.output  # diffusers "leading", steps_offset 1


def test_info_bad_steps_exit_2(cond_model):
    result = run("info", cond_model, "--steps", 0)
    assert result.exit_code == 2 and "steps must be" in result.output


def test_sampling_imports_no_torch(tmp_path, uncond_model):
    code = ("import sys; from ddengine.cli import main; "
            f"main(['sample', '--model', {str(uncond_model)!r}, '--n', '2', '--steps', '2', '--out', {str(tmp_path)!r}, '--quiet'], standalone_mode=False); "
            "from ddengine import Sampler; Sampler({m!r}).sample(1, steps=2); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('no torch')").replace("{m!r}", repr(str(uncond_model)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr


def test_png_outputs_need_1_3_or_4_channels(tmp_path):
    from tiny_models import build_tiny_model

    build_tiny_model(tmp_path / "two.onnx", channels=2)
    for args, hint in ((["--format", "png"], "--format"), (["--format", "npy", "--trajectory", "2"], "--trajectory")):
        result = run("sample", "--model", tmp_path / "two.onnx", "--out", tmp_path / "out", "--quiet", *args)
        assert result.exit_code == 2 and "PNG needs 1, 3 or 4 channels, the model makes 2" in result.output and hint in result.output
    assert not (tmp_path / "out").exists()
    result = run("sample", "--model", tmp_path / "two.onnx", "--out", tmp_path / "out", "--format", "npy", "--n", 1, "--steps", 2, "--quiet")
    assert result.exit_code == 0 and np.load(tmp_path / "out" / "00000.npy").shape == (8, 8, 2)


def test_a_failure_mid_run_exits_1_and_keeps_finished_images_listed(tmp_path, uncond_model, monkeypatch):
    from ddengine.backends.base import BackendError

    calls = {"n": 0}
    real_run = Sampler.run

    def second_chunk_fails(self, request, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise BackendError("simulated out of memory")
        return real_run(self, request, **kwargs)
    monkeypatch.setattr(Sampler, "run", second_chunk_fails)
    result = run("sample", "--model", uncond_model, "--n", 4, "--batch-size", 2, "--steps", 2, "--out", tmp_path, "--quiet")
    assert result.exit_code == 1 and "simulated out of memory" in result.output
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00000.png", "00001.png"]
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png", "manifest.jsonl"]
