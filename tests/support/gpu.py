"""Shared by the GPU-path tests: markers that skip without a GPU or TensorRT, a fake GPU identity, fp16 stand-ins."""

import importlib.util

import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

FAKE_GPU = ("NVIDIA Fake H100", "9.0")


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


def _gpu_count():
    try:
        from ddengine.gpu.driver import device_count
    except ImportError:
        return 0
    return device_count()


def _has_tensorrt():
    return importlib.util.find_spec("tensorrt") is not None


HAS_GPU = _gpu_count() > 0
GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU with cuda-python (pip install ddengine[gpu])"),
]
TRT_MARKS = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(not _has_tensorrt(), reason="needs TensorRT (pip install ddengine[gpu])"),
]


def needs_gpu(test):
    """Mark one test `gpu` and skip it without a GPU (a module uses `pytestmark = GPU_MARKS`)."""
    for mark in GPU_MARKS:
        test = mark(test)
    return test
