"""Fixtures for the GPU-path tests: a fake `tensorrt` module, a fake GPU identity, tiny ONNX models (fp32, fp16)."""
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "engine"))  # tiny_models.py: the engine tests' ONNX stand-ins

import fake_tensorrt  # noqa: E402
from tiny_models import build_tiny_model  # noqa: E402

FAKE_GPU = ("NVIDIA Fake H100", "9.0")


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


def to_mixed_fp16(src, dst):
    """Copy of a tiny model whose `gain` initializer is float16, cast back to float32 (like an AutoCast graph)."""
    model = onnx.load(str(src))
    graph = model.graph
    gain = next(t for t in graph.initializer if t.name == "gain")
    value = numpy_helper.to_array(gain).astype("float16")
    graph.initializer.remove(gain)
    graph.initializer.append(numpy_helper.from_array(value, "gain16"))
    graph.node.insert(0, helper.make_node("Cast", ["gain16"], ["gain"], to=TensorProto.FLOAT))
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


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


def _gpu_count():
    try:
        from ddengine.cuda_step import device_count
    except ImportError:
        return 0
    return device_count()


def _has_tensorrt():
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


HAS_GPU = _gpu_count() > 0
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU with cuda-python (pip install ddengine[gpu])")]
needs_tensorrt = [pytest.mark.tensorrt, pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT (pip install ddengine[gpu])")]
