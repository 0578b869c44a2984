"""The shipped models: the classifier is >= 90% accurate on real test images; fp16 of the default model keeps 35 dB."""

import json

import numpy as np
import onnx

from ddengine.model.load import default_model_path
from ddengine.quality.evaluate import FeatureNet, default_classifier_path, real_images
from tests.support.fp16_checks import sampling_psnr


def test_shipped_classifier_accuracy_on_real_test_images():
    meta = json.loads(
        {p.key: p.value for p in onnx.load(str(default_classifier_path())).metadata_props}["ddengine.classifier"]
    )
    assert meta["test_accuracy"] >= 0.9
    images, labels = real_images("test", None)
    logits, features = FeatureNet(default_classifier_path())(images[:2000])
    assert features.shape == (2000, meta["features"])
    assert np.mean(logits.argmax(1) == labels[:2000]) >= 0.9


def test_fp16_default_model_keeps_35_db_over_a_full_ddim_run(tmp_path, monkeypatch):
    import ddengine.runtime.parts
    from ddengine.export import fp16

    # both runs must compute in the graphs' own precision: on a bf16 backend (OpenVINO bf16, `auto` on AMX machines)
    # the fp32 and fp16 files would both run in bf16 and the PSNR would not measure the fp16 file against fp32
    used = []
    real = ddengine.runtime.parts.create_backend

    def spy(name, model, **kwargs):
        backend = real(name, model, **kwargs)
        used.append((backend.name, backend.precision))
        return backend

    monkeypatch.setattr(ddengine.runtime.parts, "create_backend", spy)

    half = tmp_path / "fp16.onnx"
    onnx.save(fp16.convert(onnx.load(str(default_model_path()))), str(half))
    assert half.stat().st_size < 0.6 * default_model_path().stat().st_size  # the weights really are fp16
    assert sampling_psnr(default_model_path(), half, n=4, steps=50, classes=[0, 3, 7, 9]) >= 35.0
    assert used and set(used) == {("ort-cpu", "fp32")}
