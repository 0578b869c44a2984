"""load_model: the spec from metadata bound to the graph, --scheduler-config, and every way a model file can be unusable.

Each bad model is written by tests/support/tiny_models.py with one metadata field or graph tensor at its edge;
the refusal must be a ModelError naming the file and what is wrong.
"""

import hashlib
import json

import numpy as np
import onnx
import pytest

from ddengine.model.load import ModelError, default_model_path, load_model, onnx_sha256
from ddengine.model.spec import DYNAMIC, METADATA_KEY, TensorSpec
from tests.support.tiny_models import SCHEDULER, build_tiny_model, tiny_forward64, tiny_spec


def test_reads_spec_binds_the_graph_and_hashes_the_file(cond_model):
    model = load_model(cond_model)
    assert model.spec == tiny_spec(channels=3, num_classes=4)
    assert model.sha256 == hashlib.sha256(cond_model.read_bytes()).hexdigest()
    assert model.spec.io == {
        "sample": TensorSpec("sample", "float32", (DYNAMIC, 3, 8, 8)),
        "timestep": TensorSpec("timestep", "int64", (DYNAMIC,)),
        "class_labels": TensorSpec("class_labels", "int64", (DYNAMIC,)),
        "out": TensorSpec("out", "float32", (DYNAMIC, 3, 8, 8)),
    }


def test_default_model_path_is_package_data():
    assert default_model_path().parts[-2:] == ("models", "default.onnx")


@pytest.mark.parametrize("content", [b"", b"\x00", bytes(range(256)) * 4])
def test_corrupt_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=r"(not a valid ONNX|fails the ONNX checker)") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_git_lfs_pointer_is_named(tmp_path):
    path = tmp_path / "lfs.onnx"
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n")
    with pytest.raises(ModelError, match=r"is a Git LFS pointer.*git lfs pull"):
        load_model(path)


def test_truncated_model_is_refused(tmp_path, cond_model):
    path = tmp_path / "half.onnx"
    path.write_bytes(cond_model.read_bytes()[: cond_model.stat().st_size // 2])
    with pytest.raises(ModelError, match="half.onnx"):
        load_model(path)


def test_missing_model_and_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelError, match="is not a file"):
        load_model(tmp_path)


# One metadata field (or graph tensor) at its edge -> the message the refusal must carry.
BAD_MODELS = {
    "value_range_equal": (
        dict(meta={"value_range": [1, 1]}),
        "value_range must be two finite numbers [lo, hi] with lo < hi, got (1, 1)",
    ),
    "value_range_reversed": (dict(meta={"value_range": [1, -1]}), "value_range must be two finite numbers"),
    "value_range_text": (
        dict(meta={"value_range": ["a", "b"]}),
        "value_range must be two finite numbers [lo, hi] with lo < hi, got ('a', 'b')",
    ),
    "value_range_infinite": (dict(meta={"value_range": [0, float("inf")]}), "value_range must be two finite numbers"),
    "value_range_one": (dict(meta={"value_range": [0]}), "value_range must be two finite numbers"),
    "no_timestep_role": (
        dict(num_classes=3, meta={"input_names": {"sample": "sample", "class_labels": "class_labels"}}),
        "input_names must name roles ['sample', 'timestep', 'class_labels']",
    ),
    "no_label_role": (
        dict(num_classes=3, meta={"input_names": {"sample": "sample", "timestep": "timestep"}}),
        "missing ['class_labels']",
    ),
    "unknown_role": (
        dict(meta={"input_names": {"sample": "sample", "timestep": "timestep", "mask": "mask"}}),
        "unknown ['mask']",
    ),
    "input_names_list": (dict(meta={"input_names": ["sample"]}), "input_names must map roles to tensor names"),
    "output_shape": (
        dict(out_shape=["N", 1, 8, 9]),
        "tensor 'out' (out) has shape (N, 1, 8, 9); the spec's image is (N, 1, 8, 8)",
    ),
    "output_rank": (dict(out_shape=["N", 8, 8]), "tensor 'out' (out) has shape (N, 8, 8)"),
    "fixed_batch": (
        dict(batch=4),
        "tensor 'sample' (sample) has a fixed batch of 4; export it with a dynamic batch axis",
    ),
    "spec_taller_than_graph": (
        dict(meta={"height": 16}),
        "tensor 'sample' (sample) has shape (N, 1, 8, 8); the spec's image is (N, 1, 16, 8)",
    ),
    "few_embedding_rows": (
        dict(num_classes=3, emb_rows=3),
        "class embedding 'emb' has 3 rows, but the spec allows class ids up to 3 (3 classes, null class 3)",
    ),
    "null_class_too_big": (
        dict(num_classes=3, meta={"null_class": 4}),
        "null_class 4 needs a conditional model with 0 <= null_class <= num_classes = 3",
    ),
    "null_class_unconditional": (dict(meta={"null_class": 0}), "null_class 0 needs a conditional model"),
    "null_class_negative": (dict(num_classes=3, meta={"null_class": -1}), "null_class must be an integer >= 0, got -1"),
    "guidance_negative": (
        dict(num_classes=3, meta={"recommended_guidance": -1}),
        "recommended_guidance must be null or a finite number >= 0 on a model with a null class or text "
        "conditioning, got -1",
    ),
    "guidance_nan": (
        dict(num_classes=3, meta={"recommended_guidance": float("nan")}),
        "recommended_guidance must be null or a finite",
    ),
    "guidance_without_null_class": (dict(meta={"recommended_guidance": 2.0}), "recommended_guidance must be null"),
    "channels_zero": (dict(meta={"channels": 0}), "channels must be an integer >= 1, got 0"),
    "width_text": (dict(meta={"width": "8"}), "width must be an integer >= 1, got '8'"),
    "height_bool": (dict(meta={"height": True}), "height must be an integer >= 1, got True"),
    "num_classes_negative": (dict(meta={"num_classes": -1}), "num_classes must be an integer >= 0, got -1"),
    "output_name_empty": (dict(meta={"output_name": ""}), "output_name must be a tensor name, got ''"),
    "output_name_missing": (
        dict(meta={"output_name": "y"}),
        "the graph has no output 'y' named by its spec; its outputs are ['out']",
    ),
    "scheduler_list": (dict(meta={"scheduler": [1]}), "scheduler must be a JSON object, got list"),
    "format_version": (dict(meta={"format_version": 2}), "format_version 2 is not supported (expected 1)"),
    "not_an_object": (dict(metadata_text="[1]"), "metadata must be a JSON object, got list"),
    "not_json": (dict(metadata_text="{broken"), "metadata is not valid JSON"),
    "lacks_shape": (
        dict(metadata_text=json.dumps({"format_version": 1, "scheduler": {}})),
        "metadata lacks channels, height, width",
    ),
    "sample_float64": (
        dict(sample_type=onnx.TensorProto.DOUBLE),
        "tensor 'sample' (sample) is float64; expected one of float32, float16",
    ),
    "unnamed_input": (dict(extra_input="mask"), "the graph has input(s) ['mask'] the spec does not name"),
    "missing_named_input": (
        dict(meta={"input_names": {"sample": "sample", "timestep": "timestep", "encoder_hidden_states": "ehs"}}),
        "the graph has no input 'ehs' (encoder_hidden_states) named by its spec",
    ),
    "bad_schedule": (
        dict(meta={"scheduler": {**SCHEDULER, "beta_schedule": "cosine"}}),
        "(its 'ddengine' scheduler): invalid scheduler config: beta_schedule must be one of",
    ),
    "flow_matching": (
        dict(meta={"scheduler": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}}),
        "scheduler class 'FlowMatchEulerDiscreteScheduler' is not supported",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_every_metadata_field_at_its_edge_is_a_clear_model_error(tmp_path, name):
    kwargs, message = BAD_MODELS[name]
    path = tmp_path / f"{name}.onnx"
    build_tiny_model(path, **kwargs)
    with pytest.raises(ModelError) as err:
        load_model(path)
    assert str(err.value).startswith(f"model file {path}")
    assert message in str(err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(meta={"value_range": [0, 255]}),
        dict(num_classes=3, meta={"null_class": 0}),
        dict(num_classes=3, recommended_guidance=0.0),
        dict(num_classes=3, emb_rows=4),
        dict(meta={"extra_key_from_a_newer_exporter": 1}),
        dict(scalar_timestep=True),
    ],
)
def test_the_edges_themselves_are_accepted(tmp_path, kwargs):
    build_tiny_model(tmp_path / "m.onnx", **kwargs)
    load_model(tmp_path / "m.onnx")


def test_no_metadata_needs_scheduler_config(tmp_path):
    path = tmp_path / "plain.onnx"
    build_tiny_model(path, metadata=False)
    with pytest.raises(ModelError, match=f"no '{METADATA_KEY}' metadata entry; pass --scheduler-config"):
        load_model(path)
    config = tmp_path / "scheduler_config.json"
    config.write_text(
        json.dumps(
            {
                "_class_name": "DDIMScheduler",
                "_diffusers_version": "0.30.0",
                **SCHEDULER,
                "beta_schedule": "scaled_linear",
            }
        )
    )
    model = load_model(path, config)
    assert model.spec.scheduler["beta_schedule"] == "scaled_linear"
    assert "_diffusers_version" not in model.spec.scheduler and model.spec.scheduler["_class_name"] == "DDIMScheduler"
    assert (model.spec.channels, model.spec.height, model.spec.width, model.spec.num_classes) == (1, 8, 8, 0)
    assert model.spec.schedule.beta_schedule == "scaled_linear"


def test_scheduler_config_overrides_metadata(tmp_path, uncond_model):
    config = tmp_path / "s.json"
    config.write_text(json.dumps({**SCHEDULER, "prediction_type": "v_prediction"}))
    assert load_model(uncond_model, config).spec.schedule.prediction_type == "v_prediction"
    assert load_model(uncond_model).spec.schedule.prediction_type == "epsilon"


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        (json.dumps({**SCHEDULER, "beta_schedule": "cosine"}), "beta_schedule must be one of"),
        (
            json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}),
            "scheduler class 'FlowMatchEulerDiscreteScheduler' is not supported: its config does not describe a discrete DDPM "
            "training schedule; expected one of DDPMScheduler, DDIMScheduler",
        ),
    ],
)
def test_a_bad_scheduler_config_names_the_json_file_not_the_model(tmp_path, uncond_model, content, message):
    config = tmp_path / "scheduler_config.json"
    config.write_text(content)
    with pytest.raises(ModelError) as err:
        load_model(uncond_model, config)
    assert f"scheduler config {config}" in str(err.value) and message in str(err.value)
    assert uncond_model.name not in str(err.value)


def test_unreadable_scheduler_config(tmp_path, uncond_model):
    with pytest.raises(ModelError, match=r"cannot read scheduler config .*missing.json"):
        load_model(uncond_model, tmp_path / "missing.json")
    with pytest.raises(ModelError, match=r"is a folder; expected a scheduler_config.json file"):
        load_model(uncond_model, tmp_path)


def test_conditional_model_without_metadata_is_refused(tmp_path):
    path = tmp_path / "cond_plain.onnx"
    build_tiny_model(path, num_classes=3, metadata=False)
    config = tmp_path / "s.json"
    config.write_text(json.dumps(SCHEDULER))
    with pytest.raises(ModelError, match=r"inputs \['class_labels', 'sample', 'timestep'\].*only unconditional models"):
        load_model(path, config)


def _with_external_data(src, folder, location="weights.bin"):
    proto = onnx.load(str(src))
    path = folder / "ext.onnx"
    onnx.save(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=128,
    )  # the conv weight
    return path


def test_external_data_is_part_of_the_hash(tmp_path, cond_model):
    path = _with_external_data(cond_model, tmp_path)
    data = tmp_path / "weights.bin"
    assert data.stat().st_size > 0 and path.stat().st_size < cond_model.stat().st_size  # the weights really moved out
    model = load_model(path)
    assert model.sha256 != hashlib.sha256(path.read_bytes()).hexdigest()  # the data file counts
    before = model.sha256
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1  # one bit of one weight: same .onnx file, another model
    data.write_bytes(bytes(raw))
    assert onnx_sha256(path) != before
    data.write_bytes(bytes(raw[:-1]) + bytes([raw[-1] ^ 1]))
    assert onnx_sha256(path) == before


def test_a_model_with_external_data_samples_like_the_original(tmp_path, cond_model):
    from ddengine.runtime.sampler import Sampler

    path = _with_external_data(cond_model, tmp_path)
    a, _ = Sampler(path, backend="ort-cpu").sample(2, steps=3, classes=[0, 1], guidance=2.0)
    b, _ = Sampler(cond_model, backend="ort-cpu").sample(2, steps=3, classes=[0, 1], guidance=2.0)
    assert np.array_equal(a, b)


def test_external_data_outside_the_models_folder_is_refused(tmp_path, cond_model):
    inner = tmp_path / "inner"
    inner.mkdir()
    proto = onnx.load(str(cond_model))
    path = inner / "m.onnx"
    onnx.save(
        proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=128
    )
    (inner / "w.bin").rename(tmp_path / "w.bin")
    edited = onnx.load(str(path), load_external_data=False)
    for tensor in edited.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(edited, str(path))
    with pytest.raises(ModelError):  # the checker or the hash: either way a ModelError, never a read outside
        load_model(path)
    from ddengine.model.load import external_files

    with pytest.raises(ModelError, match=r"external data location '../w.bin' points outside the model's folder"):
        external_files(edited, path)


def test_backend_runs_into_the_callers_buffer(linear_model):
    from ddengine.backends import create_backend

    path, spec = linear_model
    backend = create_backend("ort-cpu", load_model(path))
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    t, labels = np.array([321, 5, 999]), np.array([0, 1, 3])
    out = np.full_like(x, np.nan)
    assert backend.run({"sample": x, "timestep": t, "class_labels": labels}, out) is out
    np.testing.assert_allclose(out, tiny_forward64(x, t, labels, spec), atol=1e-6)


def test_closed_backend_refuses_to_run(uncond_model):
    from ddengine.backends import BackendError, create_backend

    x = np.zeros((1, 1, 8, 8), np.float32)
    feeds = {"sample": x, "timestep": np.ones(1, np.int64)}
    with create_backend("ort-cpu", load_model(uncond_model)) as backend:
        backend.run(feeds, np.empty_like(x))
    with pytest.raises(BackendError, match="closed"):
        backend.run(feeds, np.empty_like(x))


def test_unknown_backend_names_the_choices(uncond_model):
    from ddengine.backends import BackendError, create_backend

    with pytest.raises(BackendError, match="unknown backend 'tensorflow'; expected one of auto, ort-cpu"):
        create_backend("tensorflow", load_model(uncond_model))


def test_unavailable_backend_says_what_it_needs(uncond_model):
    from ddengine.backends import BackendError, available_backends, create_backend

    if "ort-cuda" in available_backends():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(
        BackendError, match="'ort-cuda' is not available here .*CUDAExecutionProvider.*available: ort-cpu"
    ):
        create_backend("ort-cuda", load_model(uncond_model))


def test_a_partial_scheduler_config_overrides_only_the_keys_it_names(tmp_path, uncond_model):
    trained = load_model(uncond_model).spec.scheduler
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"clip_sample": False, "timestep_spacing": "trailing"}))
    for given in (path, {"clip_sample": False, "timestep_spacing": "trailing"}):  # a file or a dict, as diffusers
        spec = load_model(uncond_model, given).spec
        assert spec.schedule.clip_sample is False and spec.schedule.timestep_spacing == "trailing"
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
            assert spec.scheduler[key] == trained[key], key  # the training schedule is the model's own


def test_a_partial_scheduler_config_may_not_change_the_training_schedule(uncond_model):
    with pytest.raises(ModelError, match=r"the model was trained with beta_schedule='linear'; an override may change"):
        load_model(uncond_model, {"beta_schedule": "scaled_linear"})


def test_a_config_nested_too_deep_or_a_huge_schedule_is_a_clear_error(tmp_path, uncond_model):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match="deep.json is nested more than 32 levels deep"):
        load_model(uncond_model, deep)
    with pytest.raises(ModelError, match=r"num_train_timesteps must be an integer in \[1, 100000\], got 1000000000"):
        load_model(uncond_model, {"num_train_timesteps": 10**9, "beta_schedule": "linear"})


def test_a_scheduler_config_too_large_or_with_a_huge_string_is_refused_by_its_bound(tmp_path, uncond_model):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"beta_schedule": "linear", "comment": " " * (5 << 20)}))
    with pytest.raises(ModelError, match=r"big.json is 5,242,\d+ bytes; expected at most 4,194,304"):
        load_model(uncond_model, big)
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"prediction_type": "x" * 100_000}))
    with pytest.raises(ModelError, match=r"long.json holds a string of 100,000 characters"):
        load_model(uncond_model, long)
