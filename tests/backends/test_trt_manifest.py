"""Engine manifest and cache key (engine/backends/trt_manifest.py): every key field is checked, files are written atomically."""

import hashlib
import json
import os

import numpy as np
import pytest

from ddengine.backends import trt_manifest as mf
from ddengine.backends.base import BackendError

KEY = dict(
    onnx_sha256="ab" * 32,
    precision="fp16",
    profile={"batch": (1, 8, 16), "engine_batch": (1, 16, 32)},
    hardware_compat="none",
    tensorrt_version="10.13.3",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    ddengine_version="0.1.0",
    os_name="Linux-x86_64",
)
OTHER = {
    "onnx_sha256": "cd" * 32,
    "precision": "fp32",
    "profile": {"batch": [1, 8, 32], "engine_batch": [1, 16, 64]},
    "hardware_compat": "ampere+",
    "tensorrt_version": "11.4.0",
    "gpu_name": "NVIDIA A100-SXM4-80GB",
    "compute_capability": "8.0",
    "os": "Windows-AMD64",
    "ddengine_version": "0.2.0",
}


def write_engine(tmp_path, data=b"PLAN-BYTES", key=None):
    engine = tmp_path / "model.plan"
    mf.write_atomic(engine, data)
    mf.write_manifest(
        engine,
        key or mf.make_key(**KEY),
        hashlib.sha256(data).hexdigest(),
        spec_json='{"channels": 1}',
        io={"out": {"mode": "output", "dtype": "float32", "shape": [-1, 1, 8, 8]}},
    )
    return engine


def test_key_round_trips_through_json(tmp_path):
    engine = write_engine(tmp_path)
    assert mf.read_manifest(engine)["key"] == mf.make_key(**KEY)
    assert set(mf.make_key(**KEY)) == set(mf.KEY_FIELDS)


def test_manifest_sits_next_to_the_engine(tmp_path):
    assert mf.manifest_path(tmp_path / "m.plan") == tmp_path / "m.plan.json"


@pytest.mark.parametrize("field", mf.KEY_FIELDS)
def test_each_differing_field_is_named(tmp_path, field):
    engine = write_engine(tmp_path)
    built = mf.read_manifest(engine)
    wanted = dict(built["key"], **{field: OTHER[field]})
    with pytest.raises(mf.EngineMismatchError) as info:
        mf.check_manifest(engine, built, wanted)
    assert info.value.field == field
    assert f"{field}=" in str(info.value) and repr(OTHER[field]) in str(info.value)
    assert not mf.cached_engine_ok(engine, wanted)


def test_matching_key_is_reused_and_partial_wanted_checks_only_given_fields(tmp_path):
    engine = write_engine(tmp_path)
    assert mf.cached_engine_ok(engine, mf.make_key(**KEY))
    mf.check_manifest(engine, mf.read_manifest(engine), {"tensorrt_version": "10.13.3", "os": "Linux-x86_64"})


def test_tampered_engine_is_refused_before_loading(tmp_path):
    engine = write_engine(tmp_path)
    engine.write_bytes(b"PLAN-BYTEZ")
    with pytest.raises(mf.ManifestError, match="sha256"):
        mf.read_verified_engine(engine, mf.read_manifest(engine))
    assert not mf.cached_engine_ok(engine, mf.make_key(**KEY))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "has no manifest"),
        ("{not json", "unreadable"),
        ('{"manifest_version": 99}', "manifest_version 99"),
        ('{"manifest_version": 1, "key": {}, "engine_sha256": "", "spec": {}, "io": {}}', "lacks key.onnx_sha256"),
    ],
)
def test_bad_manifests_raise_with_the_reason(tmp_path, content, message):
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"x")
    if content is not None:
        mf.manifest_path(engine).write_text(content)
    with pytest.raises(mf.ManifestError, match=message):
        mf.read_manifest(engine)


def test_bad_key_values_name_expected_and_given():
    with pytest.raises(ValueError, match=r"precision must be one of \('fp16', 'fp32'\), got 'int8'"):
        mf.make_key(**dict(KEY, precision="int8"))
    with pytest.raises(ValueError, match="hardware_compat .* got 'turing'"):
        mf.make_key(**dict(KEY, hardware_compat="turing"))


def test_the_key_s_model_hash_is_the_file_s_sha256_extended_by_its_external_data(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from ddengine.model.load import onnx_sha256

    path = tmp_path / "abc"
    path.write_bytes(b"abc")  # FIPS 180-2, appendix B.1 (the hash streams the file; `proto` stands for its parse)
    assert onnx_sha256(path, onnx.ModelProto()) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    weights = onnx.numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "w")
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["w"], ["y"])],
            "g",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
            [weights],
        )
    )
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    proto = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    before = onnx_sha256(tmp_path / "m.onnx", proto)
    (tmp_path / "m.data").write_bytes(b"\0" * 8)
    assert onnx_sha256(tmp_path / "m.onnx", proto) != before  # new weights, same graph file: another model


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    engine = write_engine(tmp_path)
    before = sorted(os.listdir(tmp_path))

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="No space"):
        mf.write_atomic(engine, b"NEW PLAN THAT NEVER LANDS")
    assert engine.read_bytes() == b"PLAN-BYTES"
    assert sorted(os.listdir(tmp_path)) == before


def test_manifest_is_plain_json_with_engine_hash(tmp_path):
    engine = write_engine(tmp_path)
    data = json.loads(mf.manifest_path(engine).read_text())
    assert data["engine_sha256"] == hashlib.sha256(b"PLAN-BYTES").hexdigest()
    assert data["manifest_version"] == mf.MANIFEST_VERSION


def test_a_mismatch_names_the_rebuild_command_its_manifest_records(tmp_path):
    engine = tmp_path / "model.plan"
    mf.write_atomic(engine, b"PLAN")
    command = "ddengine build /m/model.onnx -o /e/model.plan --precision fp16 --batch 1:8:16"
    mf.write_manifest(
        engine, mf.make_key(**KEY), mf.sha256_bytes(b"PLAN"), spec_json="{}", io={}, source={"rebuild": command}
    )
    with pytest.raises(mf.EngineMismatchError) as info:
        mf.check_manifest(engine, mf.read_manifest(engine), {"gpu_name": "NVIDIA A10"})
    assert str(info.value) == (
        f"engine {engine} was built with gpu_name='NVIDIA H100 80GB HBM3' but 'NVIDIA A10' is required here; "
        f"rebuild it with `{command}`"
    )
    assert isinstance(info.value, BackendError)  # the CLI reports it as a usage error, not a traceback


def test_the_index_lists_engines_newest_first_once_each_relative_to_the_model(tmp_path):
    model = tmp_path / "models" / "m.onnx"
    engines = [tmp_path / "engines" / f"e{i}.plan" for i in range(mf.INDEX_SIZE + 2)]
    for engine in [engines[0], *engines, engines[3]]:
        assert mf.record_engine(model, engine) == tmp_path / "models" / "m.engines.json"
    assert json.loads(mf.index_path(model).read_text())["engines"][:2] == ["../engines/e3.plan", "../engines/e17.plan"]
    recorded = [p.resolve() for p in mf.read_index(model)]
    assert recorded == [engines[3], *reversed(engines[4:]), engines[2]]  # INDEX_SIZE = 16 newest, each once


@pytest.mark.parametrize("content", ["{not json", '{"index_version": 1, "engines": "e.plan"}', "[]"])
def test_an_unreadable_index_is_named_and_a_build_starts_it_afresh(tmp_path, content):
    model = tmp_path / "m.onnx"
    mf.index_path(model).write_text(content)
    with pytest.raises(mf.ManifestError, match=r"engine index .*m\.engines\.json .*delete it"):
        mf.read_index(model)
    mf.record_engine(model, tmp_path / "e.plan")
    assert mf.read_index(model) == [tmp_path / "e.plan"]
    assert mf.read_index(tmp_path / "other.onnx") == []
