"""Fixtures for the engine tests: tiny ONNX models written on demand (see tiny_models.py)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def uncond_model(tiny_dir):
    """Unconditional 1x8x8 conv model."""
    path = tiny_dir / "uncond.onnx"
    build_tiny_model(path)
    return path


@pytest.fixture(scope="session")
def cond_model(tiny_dir):
    """Class-conditional (4 classes, null class 4) 3x8x8 conv model."""
    path = tiny_dir / "cond.onnx"
    build_tiny_model(path, channels=3, num_classes=4)
    return path


@pytest.fixture(scope="session")
def nan_model(tiny_dir):
    """Conditional model whose output is NaN for class 2 only."""
    path = tiny_dir / "nan.onnx"
    build_tiny_model(path, num_classes=4, nan_class=2)
    return path


@pytest.fixture(scope="session")
def linear_model(tiny_dir):
    """Conditional conv-free model with a float64 numpy twin (tiny_forward64)."""
    path = tiny_dir / "linear.onnx"
    spec = build_tiny_model(path, num_classes=3, conv=False)
    return path, spec
