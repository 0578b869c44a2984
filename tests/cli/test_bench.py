"""`ddengine bench` on tiny models (a few steps): every configuration in the JSON, the machine it ran on, the torch
twin found, checked and refused when it is another model's, and bad input refused before anything is measured."""

import hashlib
import importlib.util
import json
import os

import pytest
from click.testing import CliRunner

from ddengine.benchmark.harness import NUMPY, TORCH_UNAVAILABLE, diffusers_name, engine_name, floor_name
from ddengine.cli import main
from tests.support.untimed_device_loop import UntimedDeviceLoop

QUICK = ("--backend", "ort-cpu", "--batch", 1, "--steps", 2, "--repeats", 1, "--no-baselines")  # one short row


def bench(*args):
    return CliRunner().invoke(main, ["bench", *[str(a) for a in args]])


def cpuinfo_model():
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def test_bench_json_has_every_configuration_and_the_machine(tmp_path, cond_model):
    path = tmp_path / "bench.json"
    result = bench(
        "--model",
        cond_model,
        "--backend",
        "ort-cpu",
        "--batch",
        1,
        "--batch",
        3,
        "--steps",
        3,
        "--repeats",
        2,
        "--json",
        path,
    )
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    rows = {(r["batch"], r["name"]): r for r in data["rows"]}
    for batch in (1, 3):
        for name in (
            engine_name("ort-cpu"),
            floor_name("ort-cpu"),
            NUMPY,
            diffusers_name("fp32"),
            diffusers_name("bf16"),
        ):
            assert (batch, name) in rows, (batch, name)
        engine = rows[(batch, engine_name("ort-cpu"))]
        assert len(engine["runs"]) == 2 and engine["seconds"] in engine["runs"]
        assert (
            0 < engine["forward_s"]
            and 0 < engine["step_s"]
            and engine["forward_s"] + engine["step_s"] <= engine["seconds"]
        )
        assert rows[(batch, floor_name("ort-cpu"))]["forward_s"] is None  # the floor is nothing but forwards
        for p in ("fp32", "bf16"):  # no twin next to a tiny model: the reason is recorded, not a crash
            twin = rows[(batch, diffusers_name(p))]
            assert (
                twin["seconds"] is None
                and twin["note"].startswith(TORCH_UNAVAILABLE)
                and "cond.safetensors" in twin["note"]
            )
    assert data["model_sha256"] == hashlib.sha256(cond_model.read_bytes()).hexdigest()
    assert data["backends"] == {"ort-cpu": {"name": "ort-cpu", "precision": "fp32"}}
    assert (data["steps"], data["method"], data["repeats"]) == (3, "ddim", 2)
    assert set(data["summary"]) == {"1", "3"} and set(data["summary"]["3"]) == {"ort-cpu"}


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads /proc/cpuinfo")
def test_bench_json_records_the_cpu_its_isa_and_the_load(tmp_path, uncond_model):
    from ddengine.benchmark.harness import ISA_FLAGS

    path = tmp_path / "bench.json"
    result = bench("--model", uncond_model, *QUICK, "--json", path)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    machine = data["machine"]
    assert machine["cpu"] == cpuinfo_model() and set(machine["isa_flags"]) == flags & set(ISA_FLAGS)
    assert machine["logical_cpus"] == os.cpu_count()
    for load in (machine["load_average_1_5_15min"], data["load_average_after"]):
        assert len(load) == 3 and all(v >= 0 for v in load)
    assert [r["name"] for r in data["rows"]] == [engine_name("ort-cpu"), floor_name("ort-cpu")]  # --no-baselines


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from tests.support.export_helpers import export_with_twin

    root = tmp_path_factory.mktemp("bench_twins")
    path, _ = export_with_twin(root)
    other, _ = export_with_twin(root, name="other", seed=1)
    return path, other.with_suffix(".safetensors")


def _torch_rows(path):
    return {r["precision"]: r for r in json.loads(path.read_text())["rows"] if r["backend"] == "torch"}


def test_the_twin_next_to_the_model_runs_the_torch_baselines(tmp_path, twins):
    model, _ = twins
    result = bench(
        "--model",
        model,
        "--backend",
        "ort-cpu",
        "--batch",
        2,
        "--steps",
        2,
        "--repeats",
        1,
        "--json",
        tmp_path / "b.json",
    )
    assert result.exit_code == 0, result.output
    rows = _torch_rows(tmp_path / "b.json")
    assert set(rows) == {"fp32", "bf16"}
    assert all(r["note"] == "" and 0 < r["forward_s"] < r["seconds"] for r in rows.values())


def test_a_twin_of_another_model_is_refused(tmp_path, twins):
    model, other = twins
    result = bench(
        "--model",
        model,
        "--backend",
        "ort-cpu",
        "--batch",
        2,
        "--steps",
        2,
        "--repeats",
        1,
        "--torch-weights",
        other,
        "--json",
        tmp_path / "b.json",
    )
    assert result.exit_code == 0, result.output
    rows = _torch_rows(tmp_path / "b.json")
    assert all(r["seconds"] is None and "the torch model differs from m.onnx" in r["note"] for r in rows.values())


def test_the_twin_is_accepted_whatever_the_first_backends_precision(tmp_path, twins):
    model, _ = twins
    result = bench("--model", model, "--batch", 2, "--steps", 2, "--repeats", 1, "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    assert all(r["note"] == "" for r in _torch_rows(tmp_path / "b.json").values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", 0], "n must be in [1, 10000000], got 0"),
        (["--steps", 0], "steps must be >= 1, got 0"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
        (["--guidance", 2.0], "needs a class-conditional model with a null class"),
    ],
)
def test_bench_rejects_bad_input_before_measuring(tmp_path, uncond_model, monkeypatch, args, message):
    import ddengine.benchmark.harness

    monkeypatch.setattr(
        ddengine.benchmark.harness, "measure", lambda *a, **k: pytest.fail("measured before validating")
    )
    result = bench("--model", uncond_model, *args, "--json", tmp_path / "b.json")
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "b.json").exists()


def test_bench_outputs_into_a_missing_folder_or_from_missing_weights_exit_2(tmp_path, uncond_model):
    result = bench("--model", uncond_model, "--json", tmp_path / "no" / "b.json")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = bench("--model", uncond_model, "--torch-weights", tmp_path / "none.safetensors")
    assert result.exit_code == 2 and "none.safetensors" in result.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed here")
def test_plot_without_matplotlib_is_a_clear_usage_error(tmp_path, cond_model):
    result = bench("--model", cond_model, "--plot", tmp_path / "p.png")
    assert result.exit_code == 2 and "--plot needs matplotlib" in result.output


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib")
def test_plot_writes_a_png(tmp_path, uncond_model):
    result = bench("--model", uncond_model, *QUICK, "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_gpu_backend_s_rows_say_not_measured_instead_of_0_s(tmp_path, uncond_model, monkeypatch):
    """A device loop (tensorrt, ort-cuda, torch-cuda) fills no forward/step timers: null in the JSON, said in the table."""
    from ddengine.cli import bench as bench_cli

    def gpu_sampler(*args):
        sampler = open_sampler(*args)
        sampler.device_loop = UntimedDeviceLoop(sampler.host_loop)
        return sampler

    open_sampler = bench_cli.open_sampler
    monkeypatch.setattr(bench_cli, "open_sampler", gpu_sampler)
    path = tmp_path / "bench.json"
    result = bench("--model", uncond_model, *QUICK, "--json", path)
    assert result.exit_code == 0, result.output
    engine = next(r for r in json.loads(path.read_text())["rows"] if r["name"] == engine_name("ort-cpu"))
    assert (engine["forward_s"], engine["step_s"], engine["other_s"]) == (None, None, None) and engine["seconds"] > 0
    assert engine["note"].startswith("forward and step not measured")
    assert f"{engine_name('ort-cpu')} (forward and step not measured)" in " ".join(result.output.split())
