"""fp16 conversion: norms, softmax and the timestep sinusoid stay fp32, weights go fp16, output stays close."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddengine.export import fp16
from ddengine.quality.metrics import psnr
from tests.support.fp16_checks import fp32_ops


@pytest.fixture(scope="module")
def converted(tiny_onnx):
    return fp16.convert(tiny_onnx)


def _run(proto, feeds):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_norm_and_softmax_nodes_all_stay_fp32(tiny_onnx, converted):
    listed = {n.name: n.op_type for n in tiny_onnx.graph.node if n.op_type in fp16.FP32_OPS}
    assert {"InstanceNormalization", "Softmax", "Sin", "Cos"} <= set(listed.values())
    assert fp32_ops(converted) == listed


def test_io_stays_fp32_and_conv_weights_become_fp16(tiny_onnx, converted):
    assert [i.type.tensor_type.elem_type for i in converted.graph.input] == [
        i.type.tensor_type.elem_type for i in tiny_onnx.graph.input
    ]
    assert converted.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inits = {t.name: t.data_type for t in converted.graph.initializer}
    conv_weights = [n.input[1] for n in converted.graph.node if n.op_type == "Conv"]
    assert conv_weights and all(inits[w] == onnx.TensorProto.FLOAT16 for w in conv_weights)


def test_fp16_matches_torch_fp32(converted, tiny_unet):
    rng = np.random.default_rng(5)
    feeds = {
        "sample": rng.standard_normal((3, 1, 16, 16)).astype(np.float32),
        "timestep": np.array([0, 517, 999], dtype=np.int64),
        "class_labels": np.array([0, 2, 3], dtype=np.int64),
    }
    with torch.no_grad():
        want = tiny_unet(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    got = _run(converted, feeds)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    assert psnr(got, want, peak=float(np.ptp(want))) > 35


def test_timestep_path_is_blocked_up_to_the_sinusoid(tiny_onnx):
    names = fp16.timestep_nodes(tiny_onnx.graph)
    ops = {n.name: n.op_type for n in tiny_onnx.graph.node}
    assert {"Sin", "Cos"} <= {ops[n] for n in names}
    assert not {"Conv", "Gemm", "InstanceNormalization"} & {ops[n] for n in names}


def test_psnr_known_value():
    a = np.zeros(100)
    assert psnr(a, a + 0.02, peak=2.0) == pytest.approx(10 * np.log10(4 / 4e-4))
