"""Model loading: the spec from metadata, --scheduler-config, and every way a model file can be unusable."""
import json

import numpy as np
import onnx
import pytest
from tiny_models import SCHEDULER, build_tiny_model, tiny_spec

from ddengine.model import ModelError, default_model_path, load_model
from ddengine.spec import METADATA_KEY


def test_reads_spec_and_hash(cond_model):
    import hashlib

    model = load_model(cond_model)
    assert model.spec == tiny_spec(channels=3, num_classes=4)
    assert model.sha256 == hashlib.sha256(cond_model.read_bytes()).hexdigest()


def test_default_model_path_is_package_data():
    assert default_model_path().parts[-2:] == ("models", "default.onnx")


@pytest.mark.parametrize("content,message", [
    (b"", "not a valid ONNX model"),
    (b"\x00", "not a valid ONNX"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS pointer"),
    (bytes(range(256)) * 4, "not a valid ONNX"),
])
def test_corrupt_files_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_truncated_model_is_refused(tmp_path, cond_model):
    path = tmp_path / "half.onnx"
    path.write_bytes(cond_model.read_bytes()[: cond_model.stat().st_size // 2])
    with pytest.raises(ModelError, match="half.onnx"):
        load_model(path)


def test_missing_model(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_no_metadata_needs_scheduler_config(tmp_path):
    path = tmp_path / "plain.onnx"
    build_tiny_model(path, metadata=False)
    with pytest.raises(ModelError, match=f"no '{METADATA_KEY}' metadata.*--scheduler-config"):
        load_model(path)
    config = tmp_path / "scheduler_config.json"
    config.write_text(json.dumps({"_class_name": "DDIMScheduler", **SCHEDULER, "beta_schedule": "scaled_linear"}))
    model = load_model(path, config)
    assert model.spec.scheduler["beta_schedule"] == "scaled_linear" and "_class_name" not in model.spec.scheduler
    assert (model.spec.channels, model.spec.height, model.spec.width, model.spec.num_classes) == (1, 8, 8, 0)


def test_scheduler_config_overrides_metadata(tmp_path, uncond_model):
    config = tmp_path / "s.json"
    config.write_text(json.dumps({**SCHEDULER, "prediction_type": "v_prediction"}))
    assert load_model(uncond_model, config).spec.prediction_type == "v_prediction"
    config.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(uncond_model, config)
    config.write_text(json.dumps({**SCHEDULER, "beta_schedule": "cosine"}))
    with pytest.raises(ModelError, match="beta_schedule"):
        load_model(uncond_model, config)


def test_conditional_model_without_metadata_is_refused(tmp_path):
    path = tmp_path / "cond_plain.onnx"
    build_tiny_model(path, num_classes=3, metadata=False)
    config = tmp_path / "s.json"
    config.write_text(json.dumps(SCHEDULER))
    with pytest.raises(ModelError, match="class_labels"):
        load_model(path, config)


def _rewrite(src, dst, edit):
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


def test_spec_shape_mismatch_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    build_tiny_model(path, spec=tiny_spec(height=16))  # graph is 8x8, spec claims 16
    with pytest.raises(ModelError, match=r"shape \[None, 1, 8, 8\], spec expects \(N, 1, 16, 8\)"):
        load_model(path)


def test_spec_naming_a_missing_input_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    build_tiny_model(path, spec=tiny_spec(input_names={"sample": "x", "timestep": "timestep", "class_labels": "class_labels"}))
    with pytest.raises(ModelError, match=r"lacks input\(s\) \['x'\]"):
        load_model(path)


def test_bad_metadata_json_is_refused(tmp_path, uncond_model):
    def edit(proto):
        proto.metadata_props[0].value = "{broken"
    path = _rewrite(uncond_model, tmp_path / "m.onnx", edit)
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model(path)


def test_unknown_format_version_is_refused(tmp_path, uncond_model):
    def edit(proto):
        spec = json.loads(proto.metadata_props[0].value)
        proto.metadata_props[0].value = json.dumps({**spec, "format_version": 99})
    path = _rewrite(uncond_model, tmp_path / "m.onnx", edit)
    with pytest.raises(ModelError, match="format_version 99"):
        load_model(path)


def test_backend_runs_into_the_callers_buffer(linear_model):
    from tiny_models import tiny_forward64

    from ddengine.backends import create_backend

    path, spec = linear_model
    backend = create_backend("ort-cpu", load_model(path))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    out = np.full_like(x, np.nan)
    assert backend.run(x, 321, np.array([0, 1, 3]), out) is out
    np.testing.assert_allclose(out, tiny_forward64(x, 321, np.array([0, 1, 3]), spec), atol=1e-6)


def test_closed_backend_refuses_to_run(uncond_model):
    from ddengine.backends import BackendError, create_backend

    with create_backend("ort-cpu", load_model(uncond_model)) as backend:
        x = np.zeros((1, 1, 8, 8), np.float32)
        backend.run(x, 1, None, np.empty_like(x))
    with pytest.raises(BackendError, match="closed"):
        backend.run(x, 1, None, np.empty_like(x))


def test_unknown_backend_names_the_choices(uncond_model):
    from ddengine.backends import BackendError, create_backend

    with pytest.raises(BackendError, match="unknown backend 'tensorflow'; expected one of auto, ort-cpu"):
        create_backend("tensorflow", load_model(uncond_model))


def test_unavailable_backend_says_what_it_needs(uncond_model):
    from ddengine.backends import BackendError, available_backends, create_backend

    if "ort-cuda" in available_backends():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(BackendError, match="'ort-cuda' is not available here .*CUDAExecutionProvider.*available: ort-cpu"):
        create_backend("ort-cuda", load_model(uncond_model))
