"""The GPU modules import nothing heavy until used: no torch, tensorrt or cuda-python at import time."""

import subprocess
import sys

MODULES = [
    "ddengine.backends.trt",
    "ddengine.backends.trt_manifest",
    "ddengine.backends.ort_cuda",
    "ddengine.gpu.driver",
    "ddengine.gpu.memory",
    "ddengine.gpu.nvrtc",
    "ddengine.kernels.device",
    "ddengine.runtime.device_loop",
    "ddengine.cli.build",
    "ddengine.export.trt_build",
]


def test_imports_are_lazy():
    code = (
        f"import sys\nfor m in {MODULES!r}: __import__(m)\n"
        "print(sorted(k for k in ('torch', 'tensorrt', 'cuda', 'cuda.bindings') if k in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_build_help_needs_no_tensorrt():
    code = "from ddengine.cli import main; main(['build', '--help'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--hardware-compat [none|ampere+]" in proc.stdout, proc.stderr
