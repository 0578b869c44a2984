"""pytest fixtures for the TensorRT path without TensorRT: a fake `tensorrt`, a fake GPU identity, tiny ONNX models.

A test folder's conftest.py imports the ones it needs (pytest collects fixtures imported into a conftest).
"""

import sys

import pytest

from tests.support import fake_tensorrt
from tests.support.gpu import FAKE_GPU, to_mixed_fp16
from tests.support.tiny_models import build_tiny_model


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fresh fake `tensorrt` (tests/support/fake_tensorrt.py) and a fake GPU identity; returns the module."""
    from ddengine.gpu import driver

    module = fake_tensorrt.make_module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(driver, "gpu_properties", lambda device=0: FAKE_GPU)
    monkeypatch.setattr(driver, "use_device", lambda device=0: None)
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
