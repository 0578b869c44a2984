"""`ddengine sample` end to end: files and manifest, exit codes 0/1/2/128+N, bad input writing nothing, --overwrite,
--grid one row per class, the progress bar, a failed manifest append, Ctrl-C / SIGTERM at safe points, 16,000 images."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ddengine.cli import main
from ddengine.runtime.loop import HostLoop
from ddengine.runtime.sampler import Sampler
from tests.support.tiny_models import SCHEDULER, build_tiny_model

CPU = ("--backend", "ort-cpu")  # the exact fp32 path: the images are compared bit for bit with the API's


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def records(folder):
    """The manifest's image lines (a --grid has a line of its own, `grid_record`)."""
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    return [r for r in lines if "grid" not in r]


def grid_record(folder):
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    (grid,) = [r for r in lines if "grid" in r]
    return grid


def assert_manifest_lists_exactly_the_files(folder):
    """Every listed file exists, every file but the manifest is listed, and nothing else (no temp files) is there."""
    listed = {name for r in records(folder) for name in (r["file"], r.get("trajectory_file")) if name}
    assert set(os.listdir(folder)) == listed | {"manifest.jsonl"}
    return listed


def test_sample_writes_images_manifest_grid_and_strips(tmp_path, cond_model):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    result = run(
        "sample",
        "--model",
        cond_model,
        *CPU,
        "--n",
        5,
        "--steps",
        4,
        "--batch-size",
        2,
        "--seed",
        3,
        "--class",
        "all",
        "--guidance",
        2.0,
        "--out",
        out,
        "--grid",
        grid,
        "--trajectory",
        2,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    got = records(out)
    assert [(r["file"], r["trajectory_file"], r["seed"], r["class"], r["status"], r["format"]) for r in got] == [
        (f"{i:05d}.png", f"{i:05d}_trajectory.png", 3 + i, i % 4, "ok", "png") for i in range(5)
    ]
    assert {(r["steps"], r["guidance"], r["method"], r["eta"], r["spacing"], r["backend"]) for r in got} == {
        (4, 2.0, "ddim", 0.0, None, "ort-cpu")
    }
    import hashlib

    assert {r["model_sha256"] for r in got} == {hashlib.sha256(cond_model.read_bytes()).hexdigest()}
    api, _ = Sampler(cond_model, backend="ort-cpu").sample(5, steps=4, seed=3, classes="all", guidance=2.0)
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(out / f"{i:05d}.png")), api[i])
        assert Image.open(out / f"{i:05d}_trajectory.png").size == (
            3 * 10 + 2,
            2 * 10 + 2,
        )  # steps 0, 2, 3; x_t over x0
    assert_manifest_lists_exactly_the_files(out)
    assert Image.open(grid).size == (2 * 10 + 2, 4 * 10 + 2)  # 4 classes, one row each; class 0 has 2 images
    assert grid_record(out) == {
        "grid": "../grid.png",
        "sha256": {"../grid.png": hashlib.sha256(grid.read_bytes()).hexdigest()},
    }


def test_grid_has_one_row_per_class(tmp_path, cond_model):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    result = run(
        "sample",
        "--model",
        cond_model,
        *CPU,
        "--n",
        8,
        "--steps",
        2,
        "--class",
        1,
        "--class",
        2,
        "--out",
        out,
        "--grid",
        grid,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(grid))
    assert image.shape == (2 * 10 + 2, 4 * 10 + 2, 3)  # classes 1 and 2 (rows), 4 images each (columns), 2 px apart
    for i in range(8):  # the images cycle over the classes: row i % 2, column i // 2
        r, c = i % 2, i // 2
        tile = image[2 + r * 10 : 2 + r * 10 + 8, 2 + c * 10 : 2 + c * 10 + 8]
        assert np.array_equal(tile, np.asarray(Image.open(out / f"{i:05d}.png"))), i


def test_sample_npy_format(tmp_path, uncond_model):
    result = run(
        "sample", "--model", uncond_model, *CPU, "--n", 2, "--steps", 2, "--format", "npy", "--out", tmp_path, "--quiet"
    )
    assert result.exit_code == 0, result.output
    api, _ = Sampler(uncond_model, backend="ort-cpu").sample(2, steps=2)
    assert np.array_equal(np.load(tmp_path / "00001.npy"), api[1])
    assert_manifest_lists_exactly_the_files(tmp_path)


def test_nan_images_exit_1_and_the_others_are_written(tmp_path, nan_model):
    result = run(
        "sample",
        "--model",
        nan_model,
        *CPU,
        "--n",
        4,
        "--steps",
        3,
        "--class",
        1,
        "--class",
        2,
        "--out",
        tmp_path,
        "--quiet",
    )
    assert result.exit_code == 1
    assert "2 of 4 images failed" in result.output
    got = records(tmp_path)
    assert [(r["status"], r["file"]) for r in got] == [
        ("ok", "00000.png"),
        ("error", None),
        ("ok", "00002.png"),
        ("error", None),
    ]
    assert "non-finite" in got[1]["error"]
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00002.png", "manifest.jsonl"]


BAD_INPUTS = [
    (["--steps", 0], "steps must be >= 1, got 0"),
    (["--steps", 1001], "steps must be in [1, 1000], got 1001"),
    (["--steps", "abc"], "'abc' is not a valid integer"),
    (["--n", 0], "n must be in [1, 10000000], got 0"),
    (["--batch-size", 0], "batch_size must be >= 1, got 0"),
    (["--guidance", -1, "--class", 1], "guidance must be a finite number >= 0, got -1.0"),
    (["--guidance", "nan", "--class", 1], "guidance must be a finite number >= 0, got nan"),
    (["--guidance", 2], "guidance=2.0 needs classes"),
    (["--eta", "nan"], "eta must be a finite number >= 0, got nan"),
    (["--eta", -0.5], "eta must be a finite number >= 0, got -0.5"),
    (["--method", "ddpm", "--eta", 0.5], "eta applies to method 'ddim' only"),
    (["--class", 9], "class must be in [0, 3], got 9"),
    (["--class", "shoe"], "expected integers or 'all'"),
    (["--grid", "grid.txt"], "the extension picks the image format: .png, .jpg, .jpeg, .webp; got '.txt'"),
    (["--grid", "grid.npy"], "got '.npy'"),
    (["--class", "all", "--class", 1], "'all' cannot be combined with other classes"),
    (["--method", "heun"], "'heun' is not one of 'ddim', 'ddpm', 'dpmpp-2m'"),
    (["--spacing", "karras"], "'karras' is not one of 'leading', 'trailing', 'linspace'"),
    (["--threads", 0], "threads must be in [1, "),
    (["--backend", "tpu"], "unknown backend 'tpu'; expected one of auto, ort-cpu"),
    (["--seed", -1], "seed must be in [0, 18446744073709551615], got -1"),
    (["--trajectory", -1], "trajectory must be >= 1, got -1"),
]


def test_an_empty_out_is_refused(tmp_path, cond_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("sample", "--model", cond_model, "--out", "", "--quiet")
    assert (
        result.exit_code == 2 and "Invalid value for --out: expected a folder name, got an empty one" in result.output
    )
    assert list(tmp_path.iterdir()) == []


def test_a_jpeg_grid_is_a_jpeg(tmp_path, cond_model):
    result = run(
        "sample",
        "--model",
        cond_model,
        "--out",
        tmp_path / "out",
        "--n",
        4,
        "--steps",
        2,
        "--quiet",
        "--grid",
        tmp_path / "grid.jpg",
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG's start-of-image marker


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, cond_model, args, message):
    out = tmp_path / "out"
    result = run("sample", "--model", cond_model, "--out", out, "--quiet", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and not out.exists()


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: (d / "m.onnx").write_bytes(b"garbage!"), "m.onnx"),
    ],
)
def test_missing_or_corrupt_model_exits_2(tmp_path, setup, message):
    setup(tmp_path)
    result = run("sample", "--model", tmp_path / "m.onnx", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_a_bad_scheduler_config_exits_2_naming_the_file(tmp_path, uncond_model):
    config = tmp_path / "scheduler_config.json"
    config.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}))
    result = run("sample", "--model", uncond_model, "--scheduler-config", config, "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and f"scheduler config {config}" in result.output
    assert "'FlowMatchEulerDiscreteScheduler' is not supported" in result.output and not (tmp_path / "out").exists()


def test_model_without_metadata_needs_scheduler_config(tmp_path):
    build_tiny_model(tmp_path / "plain.onnx", metadata=False)
    result = run("sample", "--model", tmp_path / "plain.onnx", "--out", tmp_path / "out", "--quiet")
    assert result.exit_code == 2 and "--scheduler-config" in result.output and not (tmp_path / "out").exists()
    (tmp_path / "s.json").write_text(json.dumps(SCHEDULER))
    result = run(
        "sample",
        "--model",
        tmp_path / "plain.onnx",
        "--scheduler-config",
        tmp_path / "s.json",
        "--n",
        1,
        "--steps",
        2,
        "--out",
        tmp_path / "out",
        "--quiet",
    )
    assert result.exit_code == 0, result.output


def test_the_manifest_names_the_schedule_an_override_put_in_place(tmp_path, uncond_model):
    config = tmp_path / "s.json"
    config.write_text(json.dumps({**SCHEDULER, "timestep_spacing": "trailing", "clip_sample": False}))
    assert (
        run(
            "sample", "--model", uncond_model, *CPU, "--n", 2, "--steps", 2, "--out", tmp_path / "plain", "--quiet"
        ).exit_code
        == 0
    )
    result = run(
        "sample",
        "--model",
        uncond_model,
        *CPU,
        "--scheduler-config",
        config,
        "--n",
        2,
        "--steps",
        2,
        "--out",
        tmp_path / "over",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert all("scheduler" not in r for r in records(tmp_path / "plain"))
    for r in records(tmp_path / "over"):
        assert r["scheduler"]["timestep_spacing"] == "trailing" and r["scheduler"]["clip_sample"] is False


def test_conditional_request_on_unconditional_model_exits_2(tmp_path, uncond_model):
    for args, message in (
        (["--class", 1], "unconditional"),
        (["--class", "all"], "unconditional"),
        (["--guidance", 3], "needs a class-conditional model with a null class"),
    ):
        result = run("sample", "--model", uncond_model, "--out", tmp_path / "out", "--quiet", *args)
        assert result.exit_code == 2 and message in result.output, args
    assert not (tmp_path / "out").exists()


def test_a_request_too_big_for_memory_exits_2_naming_the_estimate(tmp_path, cond_model, monkeypatch):
    from ddengine.runtime import capacity

    monkeypatch.setattr(capacity, "available_memory", lambda: 10_000)
    result = run(
        "sample",
        "--model",
        cond_model,
        "--n",
        64,
        "--batch-size",
        64,
        "--class",
        1,
        "--guidance",
        2,
        "--out",
        tmp_path / "out",
        "--quiet",
    )
    assert result.exit_code == 2
    assert "batch_size 64 needs about" in result.output and "this machine has 9.8 KiB available" in result.output
    assert not (tmp_path / "out").exists()


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path, uncond_model):
    (tmp_path / "taken").write_text("mine")
    result = run("sample", "--model", uncond_model, "--out", tmp_path / "taken", "--quiet")
    assert (
        result.exit_code == 2 and "is a file; expected a folder" in result.output and "File exists" not in result.output
    )
    assert (tmp_path / "taken").read_text() == "mine"


def test_unwritable_out_fails_before_sampling(tmp_path, uncond_model, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(HostLoop, "denoise", lambda *a, **k: pytest.fail("sampled before checking --out"))
    result = run("sample", "--model", uncond_model, "--out", tmp_path / "file" / "out", "--quiet")
    assert result.exit_code == 2 and "not writable" in result.output


def test_grid_into_a_missing_folder_exits_2(tmp_path, cond_model):
    result = run(
        "sample", "--model", cond_model, "--out", tmp_path / "out", "--grid", tmp_path / "no" / "g.png", "--quiet"
    )
    assert result.exit_code == 2 and "does not exist" in result.output and not (tmp_path / "out").exists()


def test_an_earlier_run_is_refused_untouched_and_overwrite_replaces_only_it(tmp_path, uncond_model):
    out = tmp_path / "out"
    assert run("sample", "--model", uncond_model, "--n", 3, "--steps", 2, "--out", out, "--quiet").exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    result = run("sample", "--model", uncond_model, "--n", 1, "--steps", 2, "--out", out, "--quiet")
    assert result.exit_code == 2 and "holds an earlier run (3 image file(s) and manifest.jsonl)" in result.output
    assert "--overwrite" in result.output
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    result = run(
        "sample", "--model", uncond_model, "--n", 1, "--steps", 2, "--seed", 9, "--out", out, "--overwrite", "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ["00000.png", "manifest.jsonl", "notes.txt"]
    assert [r["seed"] for r in records(out)] == [9]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("name", ["00001.png", "00007.png", "00000_trajectory.png"])
def test_a_grid_named_like_one_of_the_runs_own_files_is_refused_before_any_work(tmp_path, uncond_model, name):
    out = tmp_path / "out"
    args = ("sample", "--model", uncond_model, "--n", 3, "--steps", 2, "--out", out, "--quiet")
    result = run(*args, "--grid", out / name)
    assert result.exit_code == 2 and f"--grid {out / name} is named like one of the run's own files" in result.output
    assert not out.exists()
    result = run("sample", "--model", uncond_model, "--out", tmp_path / "g.png", "--grid", tmp_path / "g.png")
    assert result.exit_code == 2 and "is the --out folder itself" in result.output


def test_a_grid_never_replaces_a_file_it_did_not_write(tmp_path, uncond_model):
    out, mine = tmp_path / "out", tmp_path / "mine.png"
    mine.write_bytes(b"the user's picture")
    args = ("sample", "--model", uncond_model, "--n", 2, "--steps", 2, "--quiet", "--grid", mine)
    for extra in ((), ("--overwrite",)):
        result = run(*args, "--out", out, *extra)
        assert result.exit_code == 2 and f"--grid {mine} exists and is not a grid that" in result.output
        assert mine.read_bytes() == b"the user's picture" and not out.exists()
    assert run(*args[:-2], "--out", out).exit_code == 0  # a run with no grid: its manifest records none
    result = run(*args, "--out", out, "--overwrite")
    assert result.exit_code == 2 and mine.read_bytes() == b"the user's picture"


def test_overwrite_replaces_the_earlier_runs_grid_and_never_leaves_it_behind(tmp_path, uncond_model):
    out, grid, other = tmp_path / "out", tmp_path / "grid.png", tmp_path / "out" / "other.png"
    args = ("sample", "--model", uncond_model, "--n", 2, "--steps", 2, "--out", out, "--quiet")
    assert run(*args, "--grid", grid).exit_code == 0
    first = grid.read_bytes()
    assert run(*args, "--grid", grid, "--seed", 5).exit_code == 2  # no --overwrite: refused, kept
    assert grid.read_bytes() == first
    assert run(*args, "--grid", grid, "--seed", 5, "--overwrite").exit_code == 0  # the recorded grid is replaced
    assert grid.read_bytes() != first and grid_record(out)["grid"] == "../grid.png"
    assert run(*args, "--grid", other, "--overwrite").exit_code == 0  # another grid: the earlier one goes
    assert not grid.exists() and sorted(os.listdir(out)) == ["00000.png", "00001.png", "manifest.jsonl", "other.png"]
    assert run(*args, "--overwrite").exit_code == 0  # no grid this time: nothing of the earlier run stays
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "manifest.jsonl"]


def test_a_grid_changed_since_it_was_written_stops_overwrite_by_name(tmp_path, uncond_model):
    out, grid = tmp_path / "out", tmp_path / "grid.png"
    args = ("sample", "--model", uncond_model, "--n", 2, "--steps", 2, "--out", out, "--quiet")
    assert run(*args, "--grid", grid).exit_code == 0
    grid.write_bytes(b"edited by the user")
    before = snapshot(out)
    result = run(*args, "--overwrite")
    assert result.exit_code == 2 and "grid.png (changed since this engine wrote it)" in result.output
    assert grid.read_bytes() == b"edited by the user" and snapshot(out) == before


def test_png_outputs_need_1_3_or_4_channels(tmp_path):
    build_tiny_model(tmp_path / "two.onnx", channels=2)
    for args, hint in (
        (["--format", "png"], "--format"),
        (["--format", "npy", "--trajectory", "2"], "--trajectory"),
        (["--format", "npy", "--grid", tmp_path / "g.png"], "--grid"),
    ):
        result = run("sample", "--model", tmp_path / "two.onnx", "--out", tmp_path / "out", "--quiet", *args)
        assert (
            result.exit_code == 2
            and "PNG needs 1, 3 or 4 channels, the model makes 2" in result.output
            and hint in result.output
        )
    assert not (tmp_path / "out").exists()
    result = run(
        "sample",
        "--model",
        tmp_path / "two.onnx",
        "--out",
        tmp_path / "out",
        "--format",
        "npy",
        "--n",
        1,
        "--steps",
        2,
        "--quiet",
    )
    assert result.exit_code == 0 and np.load(tmp_path / "out" / "00000.npy").shape == (8, 8, 2)


def test_a_failure_mid_run_exits_1_and_keeps_finished_images_listed(tmp_path, uncond_model, monkeypatch):
    from ddengine.backends.base import BackendError

    calls = {"n": 0}
    real = HostLoop.denoise

    def second_chunk_fails(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise BackendError("simulated out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HostLoop, "denoise", second_chunk_fails)
    result = run(
        "sample", "--model", uncond_model, *CPU, "--n", 4, "--batch-size", 2, "--steps", 2, "--out", tmp_path, "--quiet"
    )
    assert result.exit_code == 1 and "simulated out of memory" in result.output
    assert "the 2 finished image file(s) are listed in" in result.output
    assert [r["file"] for r in records(tmp_path)] == ["00000.png", "00001.png"]
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png", "manifest.jsonl"]


def test_a_failed_manifest_append_exits_1_and_removes_its_image(tmp_path, uncond_model, monkeypatch):
    real = os.write
    state = {"appends": 0}

    def write(fd, data):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if target.endswith("manifest.jsonl"):
            state["appends"] += 1
            if state["appends"] == 3:  # the disk fills up on the third image's line
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    result = run("sample", "--model", uncond_model, *CPU, "--n", 5, "--steps", 2, "--out", tmp_path, "--quiet")
    monkeypatch.undo()
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert assert_manifest_lists_exactly_the_files(tmp_path) == {"00000.png", "00001.png"}


def test_a_disk_full_while_a_trajectory_strip_is_written_leaves_its_image_off_disk_too(
    tmp_path, uncond_model, monkeypatch
):
    from ddengine.runtime import outdir

    real = outdir.OutputFolder.write

    def write(self, name, data):
        if name == "00002_trajectory.png":
            raise outdir.OutputError(f"cannot write {self.folder / name}: No space left on device")
        return real(self, name, data)

    monkeypatch.setattr(outdir.OutputFolder, "write", write)
    result = run(
        "sample", "--model", uncond_model, *CPU, "--n", 4, "--steps", 4, "--trajectory", 2, "--out", tmp_path, "--quiet"
    )
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert assert_manifest_lists_exactly_the_files(tmp_path) == {
        "00000.png",
        "00000_trajectory.png",
        "00001.png",
        "00001_trajectory.png",
    }


def test_the_progress_bar_follows_the_sampler_to_its_total(tmp_path, cond_model, monkeypatch):
    import ddengine.cli.sample as sample_cli

    updates, real = [], sample_cli.progress_bar

    def recording(quiet, description):
        bar = real(quiet, description)
        update = bar.update

        def spy(task, **kwargs):
            if "completed" in kwargs:
                updates.append(kwargs["completed"])
            return update(task, **kwargs)

        bar.update = spy
        return bar

    monkeypatch.setattr(sample_cli, "progress_bar", recording)
    result = CliRunner().invoke(
        main,
        ["sample", "--model", str(cond_model), "--n", "7", "--steps", "3", "--batch-size", "3", "--out", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    from_sampler = updates[:-1]  # the last update is the bar's own close at the total
    assert from_sampler == sorted(from_sampler) and from_sampler[-1] == 21 and len(from_sampler) == 9
    assert "21/21" in result.stderr and "wrote 7 images" in result.stderr
    final = [line for line in result.stderr.splitlines() if "21/21" in line][-1]  # labelled, with rate and times
    assert re.search(r"sampling .*21/21 steps [\d.]+/s 7/7 images \d+:\d\d:\d\d eta \d+:\d\d:\d\d", final), final


@pytest.mark.slow
def test_sixteen_thousand_images_finish(uncond_model):
    """The manifest is appended, never rewritten: 16,000 images finish (on tmpfs where there is one: no fsync cost)."""
    build = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        build_tiny_model(build / "small.onnx", height=4, width=4)
        out = build / "out"
        result = run(
            "sample",
            "--model",
            build / "small.onnx",
            *CPU,
            "--n",
            16000,
            "--steps",
            1,
            "--batch-size",
            4000,
            "--format",
            "npy",
            "--out",
            out,
            "--quiet",
        )
        assert result.exit_code == 0, result.output
        got = records(out)
        assert [r["index"] for r in got] == list(range(16000)) and len(os.listdir(out)) == 16001
        assert got[-1]["file"] == "15999.npy" and (out / "15999.npy").is_file()
    finally:
        import shutil

        shutil.rmtree(build, ignore_errors=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_at_a_safe_point_and_the_manifest_lists_exactly_the_images(tmp_path, uncond_model, signum, code):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-c",
        "from ddengine.cli import main; main()",
        "sample",
        "--model",
        str(uncond_model),
        *CPU,
        "--n",
        "64",
        "--steps",
        "900",
        "--batch-size",
        "1",
        "--out",
        str(out),
        "--quiet",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:  # wait until two images are finished
            manifest = out / "manifest.jsonl"
            if manifest.exists() and manifest.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    listed = assert_manifest_lists_exactly_the_files(out)
    assert 2 <= len(listed) < 64
    assert f"stopped: {len(listed)} image file(s) written, each listed in {out / 'manifest.jsonl'}" in stderr
    assert [r["index"] for r in records(out)] == list(range(len(listed)))  # in order, none half-done
    api, _ = Sampler(uncond_model, backend="ort-cpu").sample(1, steps=900, seeds=[len(listed) - 1])
    assert np.array_equal(np.asarray(Image.open(out / f"{len(listed) - 1:05d}.png"))[..., None], api[0])


def test_sampling_imports_no_torch(tmp_path, uncond_model):
    code = (
        "import sys; from ddengine.cli import main; "
        f"main(['sample', '--model', {str(uncond_model)!r}, '--n', '2', '--steps', '2', '--out', {str(tmp_path)!r}, '--quiet'], "
        "standalone_mode=False); "
        f"from ddengine import Sampler; Sampler({str(uncond_model)!r}).sample(1, steps=2); "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('no torch')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "no torch" in result.stdout, result.stderr


def test_the_default_model_is_sampled_without_model(tmp_path):
    result = run("sample", "--n", 2, "--steps", 2, "--class", 3, "--out", tmp_path, "--quiet")
    assert result.exit_code == 0, result.output
    got = records(tmp_path)
    assert [(r["status"], r["class"]) for r in got] == [("ok", 3), ("ok", 3)]
    assert Image.open(tmp_path / "00001.png").size == (32, 32)


def test_running_out_of_memory_is_one_line_naming_what_did_not_fit(tmp_path, cond_model, monkeypatch):
    import ddengine.cli.sample as sample_command

    def too_big(*args, **kwargs):
        raise MemoryError("Unable to allocate 7.45 GiB for an array with shape (1000000000,) and data type float64")

    monkeypatch.setattr(sample_command, "write_run", too_big)
    result = run("sample", "--model", cond_model, "--out", tmp_path / "out", "--n", 2, "--steps", 2, "--quiet")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        "Error: out of memory: Unable to allocate 7.45 GiB for an array with shape (1000000000,) and data type "
        "float64; sample fewer images at once (--batch-size, --n)"
    )


def test_image_to_image_from_a_png_and_an_input_the_run_may_clear_is_refused(tmp_path, cond_model):
    picture = np.add.outer(np.arange(8), np.arange(8)).astype(np.uint8)[:, :, None].repeat(3, axis=2) * 17
    source = tmp_path / "start.png"
    Image.fromarray(picture).save(source)
    out = tmp_path / "out"
    args = ("sample", "--model", cond_model, *CPU, "--n", 2, "--steps", 6, "--class", 1, "--image", source)
    result = run(*args, "--strength", 0.5, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    want, _ = Sampler(cond_model, backend="ort-cpu").sample(2, steps=6, classes=1, image=picture, strength=0.5)
    got = np.stack([np.asarray(Image.open(out / r["file"])) for r in records(out)])
    assert np.array_equal(got, want) and {r["strength"] for r in records(out)} == {0.5}
    inside = run(*args[:-1], out / "00000.png", "--out", out, "--overwrite", "--quiet")
    assert inside.exit_code == 2 and "lies in --out" in inside.output and (out / "00000.png").exists()
    mask = tmp_path / "mask.png"
    Image.fromarray(np.where(np.arange(8)[:, None] < 4, 255, 0).astype(np.uint8).repeat(8, axis=1)).save(mask)
    result = run(*args, "--mask", mask, "--out", tmp_path / "inpainted", "--quiet")
    assert result.exit_code == 0, result.output
    want, _ = Sampler(cond_model, backend="ort-cpu").sample(
        2, steps=6, classes=1, image=picture, mask=np.asarray(Image.open(mask))
    )
    got = np.stack(
        [np.asarray(Image.open(tmp_path / "inpainted" / r["file"])) for r in records(tmp_path / "inpainted")]
    )
    assert np.array_equal(got, want)


@pytest.mark.parametrize(
    "args",
    [
        ("sample", "--class", 1, "--n", 1, "--steps", 2, "--out", "LONG"),
        ("sample", "--class", 1, "--n", 1, "--steps", 2, "--out", "OUT", "--grid", "LONG.png"),
        ("bench", "--steps", 2, "--batch", 1, "--no-baselines", "--json", "LONG.json"),
    ],
)
def test_a_file_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path, cond_model, args):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    long = str(tmp_path / ("n" * (limit + 1)))
    given = [str(a).replace("LONG", long).replace("OUT", str(tmp_path / "out")) for a in args]
    result = run(*given[:1], "--model", cond_model, *CPU, *given[1:])
    assert result.exit_code == 2 and f"this file system takes at most {limit}" in result.output
    assert "Traceback" not in result.output and sorted(os.listdir(tmp_path)) == []
