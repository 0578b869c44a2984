"""`build_engine` and the TensorRT backend against a fake `tensorrt` (fake_tensorrt.py): what the builder is told,
that every None/False return raises with TensorRT's own text, caching by key, and atomic publication."""

import hashlib
import json

import onnx
import pytest

from ddengine.backends import trt as trt_backend
from ddengine.backends import trt_manifest as mf
from ddengine.export.trt_build import BuildConfig, BuildError, build_engine, parse_batch
from tests.support.gpu import FAKE_GPU


def config(onnx, tmp_path, **kw):
    return BuildConfig(onnx_path=onnx, engine_path=tmp_path / "out" / "model.plan", **kw)


def calls(fake, name):
    return [c for c in fake.state.calls if c[0] == name]


def test_fp16_build_is_strongly_typed_and_never_sets_fp16(fake_trt, onnx16, tmp_path):
    result = build_engine(config(onnx16, tmp_path, batch=(1, 4, 8), workspace_gb=2))
    assert calls(fake_trt, "create_network") == [("create_network", 1 << 5)]  # STRONGLY_TYPED = 5 in the fake
    assert calls(fake_trt, "set_flag") == []  # no BuilderFlag.FP16 (removed in TensorRT 11)
    assert ("set_memory_pool_limit", "WORKSPACE", 2 * 2**30) in fake_trt.state.calls
    assert calls(fake_trt, "set_shape") == [
        ("set_shape", "sample", (1, 1, 8, 8), (4, 1, 8, 8), (8, 1, 8, 8)),
        ("set_shape", "timestep", (1,), (4,), (8,)),
    ]
    assert not result.reused and result.engine_path.read_bytes().startswith(b"FAKEPLAN")


def test_manifest_records_the_key_and_hashes(fake_trt, onnx16, tmp_path):
    result = build_engine(config(onnx16, tmp_path, batch=(2, 4, 8)))
    manifest = json.loads(mf.manifest_path(result.engine_path).read_text())
    key = manifest["key"]
    assert key["onnx_sha256"] == hashlib.sha256(onnx16.read_bytes()).hexdigest()
    assert manifest["engine_sha256"] == hashlib.sha256(result.engine_path.read_bytes()).hexdigest()
    assert (key["gpu_name"], key["compute_capability"]) == FAKE_GPU
    assert key["tensorrt_version"] == "10.99.0" and key["precision"] == "fp16" and key["hardware_compat"] == "none"
    assert key["profile"] == {"batch": [2, 4, 8], "engine_batch": [2, 4, 8]}
    assert manifest["spec"]["channels"] == 1 and manifest["io"]["out"]["dtype"] == "float32"


def test_conditional_profile_doubles_for_guidance(fake_trt, cond16, tmp_path):
    result = build_engine(config(cond16, tmp_path, batch=(1, 4, 8)))
    assert result.manifest["key"]["profile"]["engine_batch"] == [1, 8, 16]
    shapes = {c[1]: c[2:] for c in calls(fake_trt, "set_shape")}
    assert shapes["sample"] == ((1, 3, 8, 8), (8, 3, 8, 8), (16, 3, 8, 8))
    assert shapes["class_labels"] == ((1,), (8,), (16,))


def test_same_key_reuses_and_any_change_rebuilds(fake_trt, onnx16, tmp_path):
    first = build_engine(config(onnx16, tmp_path))
    assert build_engine(config(onnx16, tmp_path)).reused and fake_trt.state.builds == 1
    assert not build_engine(config(onnx16, tmp_path, batch=(1, 8, 32))).reused and fake_trt.state.builds == 2
    assert (
        not build_engine(config(onnx16, tmp_path, batch=(1, 8, 32), force=True)).reused and fake_trt.state.builds == 3
    )
    fake_trt.__version__ = "11.4.0"
    rebuilt = build_engine(config(onnx16, tmp_path, batch=(1, 8, 32)))
    assert not rebuilt.reused and rebuilt.manifest["key"]["tensorrt_version"] == "11.4.0"
    assert first.engine_path == rebuilt.engine_path


def test_tampered_cached_engine_is_rebuilt(fake_trt, onnx16, tmp_path):
    result = build_engine(config(onnx16, tmp_path))
    result.engine_path.write_bytes(b"something else")
    assert not build_engine(config(onnx16, tmp_path)).reused


def test_timing_cache_is_read_and_written(fake_trt, onnx16, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"OLD")
    build_engine(config(onnx16, tmp_path, timing_cache=cache))
    assert calls(fake_trt, "create_timing_cache") == [("create_timing_cache", b"OLD")]
    assert cache.read_bytes() == b"TIMING:OLD"


@pytest.mark.parametrize(
    "fault, expected",
    [
        ("parse", ["INVALID_NODE: Invalid Node - /Conv unsupported", "failed to import /Conv", "could not parse"]),
        ("build", ["could not build an engine", "could not find any implementation for node /conv"]),
        ("create_builder_config", ["create_builder_config() failed", "out of host memory"]),
        ("add_optimization_profile", ["rejected the optimization profile", "MIN<=OPT<=MAX"]),
        ("create_timing_cache", ["create_timing_cache", "timing cache is corrupted"]),
        ("set_timing_cache", ["set_timing_cache() failed", "timing cache mismatch"]),
        ("deserialize", ["deserialize_cuda_engine(new plan) failed", "Serialization assertion"]),
    ],
)
def test_none_or_false_returns_raise_with_the_logger_text(fake_trt, onnx16, tmp_path, fault, expected):
    fake_trt.state.faults.add(fault)
    with pytest.raises((BuildError, trt_backend.TensorRTError)) as info:
        build_engine(config(onnx16, tmp_path))
    for text in expected:
        assert text in str(info.value)
    assert not (tmp_path / "out" / "model.plan").exists()


def test_failed_rebuild_keeps_the_previous_engine(fake_trt, onnx16, tmp_path):
    result = build_engine(config(onnx16, tmp_path))
    engine, manifest = result.engine_path.read_bytes(), result.manifest_path.read_bytes()
    fake_trt.state.faults.add("build")
    with pytest.raises(BuildError):
        build_engine(config(onnx16, tmp_path, force=True))
    assert result.engine_path.read_bytes() == engine and result.manifest_path.read_bytes() == manifest
    assert sorted(p.name for p in result.engine_path.parent.iterdir()) == ["model.plan", "model.plan.json"]


def test_precision_must_match_the_onnx(fake_trt, onnx32, onnx16, tmp_path):
    with pytest.raises(BuildError, match=r"needs a float16 ONNX.*ddengine export --fp16"):
        build_engine(config(onnx32, tmp_path, precision="fp16"))
    with pytest.raises(BuildError, match="contains float16 tensors"):
        build_engine(config(onnx16, tmp_path, precision="fp32"))
    assert build_engine(config(onnx32, tmp_path, precision="fp32")).manifest["key"]["precision"] == "fp32"
    assert fake_trt.state.builds == 1


def test_hardware_compat_sets_ampere_plus(fake_trt, onnx16, tmp_path):
    build_engine(config(onnx16, tmp_path, hardware_compat="ampere+"))
    assert fake_trt.state.config.hardware_compatibility_level == "AMPERE_PLUS"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"precision": "int8"}, "precision must be one of fp16, fp32, got 'int8'"),
        ({"batch": (4, 2, 8)}, r"1 <= MIN <= OPT <= MAX, got \(4, 2, 8\)"),
        ({"workspace_gb": 0}, "workspace_gb must be > 0, got 0"),
        ({"hardware_compat": "turing"}, "hardware_compat must be one of none, ampere\\+, got 'turing'"),
    ],
)
def test_bad_config_names_expected_and_given(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        BuildConfig(onnx_path=tmp_path / "m.onnx", **kw)


def test_parse_batch():
    assert parse_batch("1:4:16") == (1, 4, 16) and parse_batch("8") == (8, 8, 8)
    for bad in ("4:2:8", "0:1:2", "a:b:c", "1:2"):
        with pytest.raises(ValueError, match=repr(bad)):
            parse_batch(bad)


def test_missing_tensorrt_names_the_extra(no_trt, onnx16, tmp_path):
    with pytest.raises(trt_backend.TensorRTMissingError, match=r"pip install ddengine\[gpu\]"):
        build_engine(config(onnx16, tmp_path))


def save_external(src, dst, location):
    model = onnx.load(str(src))
    onnx.save(
        model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return dst


def test_changed_external_weights_rebuild_the_engine(fake_trt, onnx16, tmp_path):
    path = save_external(onnx16, tmp_path / "ext.onnx", "ext.weights")
    first = build_engine(config(path, tmp_path))
    assert first.manifest["key"]["onnx_sha256"] != hashlib.sha256(path.read_bytes()).hexdigest()
    assert build_engine(config(path, tmp_path)).reused
    weights = tmp_path / "ext.weights"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one changed weight bit, same .onnx file
    weights.write_bytes(bytes(data))
    again = build_engine(config(path, tmp_path))
    assert not again.reused and again.manifest["key"]["onnx_sha256"] != first.manifest["key"]["onnx_sha256"]


def test_external_data_outside_the_model_folder_is_refused(onnx16, tmp_path):
    from ddengine.model.load import ModelError, load_model

    sub = tmp_path / "models"
    sub.mkdir()
    path = save_external(onnx16, tmp_path / "tmp.onnx", "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(model, str(sub / "evil.onnx"))
    with pytest.raises(ModelError, match="'../w.bin' points outside"):
        load_model(sub / "evil.onnx")


def test_the_exporters_fp16_model_is_accepted_as_fp16(fake_trt, tmp_path):
    """The fp16 ONNX that `ddengine export --fp16` makes (export/fp16.py) passes the fp16 check; its fp32 source does not."""
    pytest.importorskip("onnxconverter_common", reason="export/fp16.py needs onnxconverter-common")
    from ddengine.export.fp16 import convert
    from ddengine.export.trt_build import onnx_precision
    from tests.support.tiny_models import build_tiny_model

    src = tmp_path / "cond32.onnx"
    build_tiny_model(src, channels=3, num_classes=4)
    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    assert onnx_precision(model) == "fp32"
    mixed = convert(model)
    assert onnx_precision(mixed) == "fp16"
    assert [i.type.tensor_type.elem_type for i in mixed.graph.input][0] == onnx.TensorProto.FLOAT  # fp32 I/O kept
    dst = tmp_path / "cond16.onnx"
    onnx.save(mixed, str(dst))
    assert build_engine(config(dst, tmp_path, precision="fp16")).manifest["key"]["precision"] == "fp16"


def test_the_manifest_records_the_onnx_and_the_command_that_rebuilds_it(fake_trt, onnx16, tmp_path):
    result = build_engine(config(onnx16, tmp_path, batch=(1, 2, 4), hardware_compat="ampere+"))
    assert result.manifest["source"] == {
        "onnx_path": str(onnx16.resolve()),
        "rebuild": f"ddengine build {onnx16.resolve()} -o {(tmp_path / 'out' / 'model.plan').resolve()} "
        "--precision fp16 --batch 1:2:4 --hardware-compat ampere+",
    }
    assert json.loads(result.manifest_path.read_text())["source"] == result.manifest["source"]


def test_each_build_or_reuse_puts_its_engine_first_in_the_model_s_index(fake_trt, onnx16, tmp_path):
    first = build_engine(config(onnx16, tmp_path))
    assert first.index_path == tmp_path / "uncond_fp16.engines.json" and first.index_error == ""
    other = build_engine(BuildConfig(onnx_path=onnx16, engine_path=tmp_path / "other.plan"))
    assert mf.read_index(onnx16) == [other.index_path.parent / "other.plan", tmp_path / "out" / "model.plan"]
    again = build_engine(config(onnx16, tmp_path))
    assert again.reused and mf.read_index(onnx16)[0] == tmp_path / "out" / "model.plan"


def test_an_index_that_cannot_be_written_is_reported_and_the_engine_kept(fake_trt, onnx16, tmp_path):
    mf.index_path(onnx16).mkdir()  # in the index's place: a folder, as unwritable as a read-only model folder
    result = build_engine(config(onnx16, tmp_path))
    assert result.index_path is None and "uncond_fp16.engines.json" in result.index_error
    assert mf.read_manifest(result.engine_path)["engine_sha256"] == mf.sha256_bytes(result.engine_path.read_bytes())
