"""bench/bench_gpu.py and bench/gpu_check without a GPU: imports without torch, a clear exit 2, the dry run."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.gpu import HAS_GPU

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_gpu.py"


def test_imports_without_torch():
    code = (
        f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('bench_gpu', {str(SCRIPT)!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print('torch' in sys.modules, m.parse_args(['--batches', '2,4']).batches)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "[2,", "4]"], proc.stderr


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the no-GPU error cannot be provoked")
def test_without_a_gpu_exits_2_with_a_message():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--batches", "1", "--steps", "2"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args", [["--batches", "0"], ["--batches", "a"], ["--steps", "0"]])
def test_bad_arguments_are_refused(args):
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None,
    reason="the dry run loads the torch twin and diffusers' scheduler",
)
def test_gpu_check_dry_run_collects_the_gpu_tests_and_builds_every_bench_configuration(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check"), "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["dry_run"] and summary["tests"]["tests"] >= 10 and summary["bench_exit"] == 0
    log = (tmp_path / "log").read_text()
    assert "dry run: default.onnx and its torch twin" in log and "8 configurations of 50 steps are valid" in log
