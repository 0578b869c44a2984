"""bench/bench_gpu.py imports without torch and, on a machine without a GPU, exits 2 with a clear message."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_gpu.py"


def test_imports_without_torch():
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('bench_gpu', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print('torch' in sys.modules, m.parse_args(['--batches', '2,4']).batches)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["False", "[2,", "4]"], proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("cuda") is not None and __import__("ddengine.cuda_step").cuda_step.device_count() > 0,
                    reason="a GPU is present: the no-GPU error cannot be provoked")
def test_without_a_gpu_exits_2_with_a_message():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batches", "1", "--steps", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr, proc.stderr


def test_bad_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--batches", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr
