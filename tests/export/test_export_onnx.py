"""ONNX export of the U-Net: parity with torch at several batch sizes, I/O contract, metadata round trip."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddengine.export import onnx_export
from ddengine.model.spec import METADATA_KEY, ModelSpec


def _session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_runtime_matches_torch_at_any_batch(tiny_onnx, tiny_unet, batch):
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, 1, 16, 16)).astype(np.float32)
    t = rng.integers(0, 1000, batch).astype(np.int64)
    y = np.array([0, 1, 2, 3][:batch], dtype=np.int64)  # 3 = the null class
    (got,) = _session(tiny_onnx).run(None, {"sample": x, "timestep": t, "class_labels": y})
    with torch.no_grad():
        want = tiny_unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert np.abs(want).max() > 1e-2  # the random weights give a non-trivial output
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_io_contract_and_opset(tiny_onnx):
    ins = {i.name: i.type.tensor_type for i in tiny_onnx.graph.input}
    assert list(ins) == ["sample", "timestep", "class_labels"]
    assert ins["sample"].elem_type == onnx.TensorProto.FLOAT and ins["timestep"].elem_type == onnx.TensorProto.INT64
    assert ins["class_labels"].elem_type == onnx.TensorProto.INT64
    assert ins["sample"].shape.dim[0].dim_param and not ins["sample"].shape.dim[0].dim_value  # dynamic batch
    assert [o.name for o in tiny_onnx.graph.output] == ["out"]
    assert max(o.version for o in tiny_onnx.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_metadata_round_trips_through_model_spec(tiny_onnx, tiny_spec):
    props = {p.key: p.value for p in tiny_onnx.metadata_props}
    spec = ModelSpec.from_json(props[METADATA_KEY])
    assert spec == tiny_spec
    sched = json.loads(props[METADATA_KEY])["scheduler"]
    assert sched["prediction_type"] == "epsilon" and sched["clip_sample"] is False and sched["clip_sample_range"] == 1.0
    for key in ("timestep_spacing", "set_alpha_to_one", "steps_offset", "num_train_timesteps", "beta_schedule"):
        assert key in sched
    assert (spec.num_classes, spec.null_class, spec.channels, spec.height, spec.width) == (3, 3, 1, 16, 16)


def test_written_file_loads_in_the_engine(tmp_path, tiny_onnx, tiny_spec):
    from ddengine.model.load import load_model

    path = tmp_path / "m.onnx"
    onnx_export.write_model(tiny_onnx, path)
    assert load_model(path).spec == tiny_spec
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temp file left behind


def test_verify_fails_loudly_when_onnx_differs(tiny_onnx, tiny_unet, tiny_spec):
    import copy

    other = copy.deepcopy(tiny_unet)
    with torch.no_grad():
        other.conv_out.bias.add_(1e-3)
    with pytest.raises(onnx_export.ExportError, match="differs from torch"):
        onnx_export.verify(tiny_onnx, other, tiny_spec, atol=1e-4)


def test_unwritable_output_folder_is_an_error(tmp_path, tiny_onnx):
    with pytest.raises(OSError, match="does not exist"):
        onnx_export.write_model(tiny_onnx, tmp_path / "missing" / "m.onnx")
