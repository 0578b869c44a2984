"""Fixtures shared by every test folder: tiny ONNX models written on demand (tests/support/tiny_models.py)."""

import os
from types import SimpleNamespace

# torch's OpenMP pool spins on every core; next to other work (a training run on a 2-core box) a 6-step tiny-U-Net
# test took 9 s with 2 threads and 0.2 s with 1. Set before torch is first imported; an explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib

import pytest

from tests.support.tiny_models import build_tiny_model
from tests.support.trt_fixtures import cond16, fake_trt, no_trt, onnx16, onnx32  # noqa: F401  (TensorRT stand-ins)

# What README's test install provides (the export and test extras, openvino): in CI a missing one is a broken install
# step and fails the tests that need it instead of skipping them. GPU packages (tensorrt, cuda) still skip.
ORACLES = (
    "torch",
    "diffusers",
    "transformers",
    "safetensors",
    "scipy",
    "ray",
    "openvino",
    "onnxconverter_common",
    "fastapi",
    "httpx",
    "prometheus_client",
)


def importorskip_unless_ci(modname, *args, _skip=pytest.importorskip, **kwargs):
    """pytest.importorskip, except that with CI=true a missing oracle package fails."""
    if os.environ.get("CI", "").lower() != "true" or modname.split(".")[0] not in ORACLES:
        return _skip(modname, *args, **kwargs)
    try:
        return importlib.import_module(modname)
    except ImportError as err:
        pytest.fail(
            f"CI=true: {modname} is installed by README's test command but cannot be imported ({err})", pytrace=False
        )


pytest.importorskip = importorskip_unless_ci


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


@pytest.fixture(scope="session")
def eval_setup(tmp_path_factory):
    """Tiny Fashion-MNIST files (40 train, 30 test), an untrained classifier (ONNX and its torch module, the oracle)
    and a 1x32x32 tiny model with 10 classes: what `ddengine eval` and ddengine.quality.evaluate need, in seconds."""
    pytest.importorskip("torch")
    from tests.support.export_helpers import tiny_classifier, tiny_fashion_mnist

    root = tmp_path_factory.mktemp("eval")
    sets = tiny_fashion_mnist(root / "data")
    net = tiny_classifier(root / "clf.onnx")
    build_tiny_model(root / "model.onnx", channels=1, height=32, width=32, num_classes=10)
    return SimpleNamespace(
        root=root, data=root / "data", classifier=root / "clf.onnx", model=root / "model.onnx", net=net, sets=sets
    )
