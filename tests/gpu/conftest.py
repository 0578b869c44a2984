"""Fixtures for the GPU-path tests: a fake `tensorrt` module, a fake GPU identity, tiny ONNX models (fp32, fp16)."""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "engine"))  # tiny_models.py: the engine tests' ONNX stand-ins

import fake_tensorrt  # noqa: E402
from gpu_support import FAKE_GPU, to_mixed_fp16  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fresh fake `tensorrt` (see fake_tensorrt.py) and a fake GPU identity; returns the module."""
    module = fake_tensorrt.make_module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    import ddengine.cuda_step as cuda_step

    monkeypatch.setattr(cuda_step, "gpu_properties", lambda device=0: FAKE_GPU)
    monkeypatch.setattr(cuda_step, "use_device", lambda device=0: None)
    return module


@pytest.fixture
def no_trt(monkeypatch):
    """Make `import tensorrt` fail even where TensorRT is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def onnx32(tmp_path):
    path = tmp_path / "uncond.onnx"
    build_tiny_model(path, conv=False)
    return path


@pytest.fixture
def onnx16(tmp_path, onnx32):
    return to_mixed_fp16(onnx32, tmp_path / "uncond_fp16.onnx")


@pytest.fixture
def cond16(tmp_path):
    path = tmp_path / "cond.onnx"
    build_tiny_model(path, channels=3, num_classes=4, conv=False)
    return to_mixed_fp16(path, tmp_path / "cond_fp16.onnx")
