"""ModelSpec and TensorSpec: the metadata round trip, the checks on construction, roles, CFG rows and the TensorRT profile."""

import json

import numpy as np
import pytest

from ddengine.model.spec import DYNAMIC, METADATA_KEY, ModelSpec, ModelSpecError, TensorSpec
from tests.support.tiny_models import SCHEDULER, tiny_spec


def test_json_round_trip_and_unknown_keys():
    spec = tiny_spec(channels=3, num_classes=4, recommended_guidance=1.5, value_range=(0.0, 1.0))
    back = ModelSpec.from_json(spec.to_json())
    assert back == spec and back.value_range == (0.0, 1.0) and back.recommended_guidance == 1.5
    data = json.loads(spec.to_json())
    assert "io" not in data  # bound from the graph at load time, never stored
    assert ModelSpec.from_json(json.dumps({**data, "written_by": "a newer exporter"})) == spec


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(channels=0), "channels must be an integer >= 1, got 0"),
        (dict(height=2.0), "height must be an integer >= 1, got 2.0"),
        (dict(value_range=(1.0, 1.0)), "lo < hi"),
        (dict(value_range=(0.0, float("nan"))), "two finite numbers"),
        (
            dict(num_classes=2, null_class=3),
            "null_class 3 needs a conditional model with 0 <= null_class <= num_classes = 2",
        ),
        (dict(num_classes=2, null_class=True), "null_class must be an integer >= 0, got True"),
        (
            dict(num_classes=2, null_class=2, recommended_guidance=-0.5),
            "recommended_guidance must be null or a finite number >= 0",
        ),
        (dict(num_classes=2, recommended_guidance=1.0), "on a model with a null class"),
        (dict(input_names={"sample": "x"}), "missing ['timestep']"),
        (dict(input_names={"sample": "x", "timestep": ""}), "input_names must map roles to tensor names"),
        (dict(output_name=None), "output_name must be a tensor name, got None"),
        (dict(output_name=7), "output_name must be a tensor name, got 7"),
        (dict(value_range="x" * 5_000_000), "got 'xxxxx"),
        (dict(scheduler="linear"), "scheduler must be a JSON object, got str"),
        (dict(recommended_method="dpmpp-2m"), "must be both null, or one of ddim"),
        (dict(recommended_steps=10), "got None and 10"),
        (dict(recommended_method="heun", recommended_steps=10), "got 'heun' and 10"),
        (dict(recommended_method="unipc", recommended_steps=0), "an integer >= 1; got 'unipc' and 0"),
        (dict(recommended_method="unipc", recommended_steps=True), "got 'unipc' and True"),
        (dict(num_classes=2, class_names=("a",)), "class_names must be null or 2 distinct non-empty names"),
        (dict(num_classes=2, class_names=("Bag", "bag")), "case-insensitively distinct"),
        (dict(num_classes=2, class_names=("Bag", " ")), "2 distinct non-empty names"),
        (dict(num_classes=1, class_names=("x" * 101,)), "at most 100 characters"),
    ],
)
def test_construction_checks_every_field(kwargs, message):
    fields = dict(scheduler=dict(SCHEDULER), channels=1, height=8, width=8) | kwargs
    with pytest.raises(ModelSpecError) as err:
        ModelSpec(**fields)
    assert message in str(err.value) and METADATA_KEY in str(err.value)


def test_recommended_schedule_and_class_names_round_trip():
    spec = tiny_spec(num_classes=2, recommended_method="dpmpp-2m", recommended_steps=12, class_names=("Bag", "Coat"))
    back = ModelSpec.from_json(spec.to_json())
    assert (back.recommended_method, back.recommended_steps, back.class_names) == ("dpmpp-2m", 12, ("Bag", "Coat"))


def test_a_huge_metadata_value_is_named_not_echoed():
    with pytest.raises(ModelSpecError) as err:
        ModelSpec(scheduler=dict(SCHEDULER), channels=1, height=8, width=8, value_range=["x" * 5_000_000, 1])
    assert len(str(err.value)) < 500 and "characters)" in str(err.value)


def test_roles_follow_the_model_kind():
    assert tiny_spec().roles() == ["sample", "timestep"]
    assert tiny_spec(num_classes=3).roles() == ["sample", "timestep", "class_labels"]
    # class_labels named but unused on an unconditional model (an exporter's default names): not a role
    assert ModelSpec(scheduler={}, channels=1, height=8, width=8).roles() == ["sample", "timestep"]


def test_guidance_needs_a_null_class():
    assert (tiny_spec().cfg_factor, tiny_spec().guidable) == (1, False)
    assert (tiny_spec(num_classes=3).cfg_factor, tiny_spec(num_classes=3).guidable) == (2, True)
    no_null = ModelSpec(scheduler={}, channels=1, height=8, width=8, num_classes=3)
    assert (no_null.cfg_factor, no_null.guidable, no_null.conditional) == (1, False, True)


@pytest.mark.parametrize("num_classes, guidance", [(0, None), (4, None), (4, 2.0), (4, 0.0), (4, 1.0)])
def test_batch_profile_covers_the_rows_the_batch_runs(cond_model, uncond_model, num_classes, guidance):
    """The TensorRT profile's row range must hold every forward ImageBatch can make for 1..max images."""
    from ddengine.backends import create_backend
    from ddengine.core.plan import make_plan
    from ddengine.model.load import load_model
    from ddengine.runtime.batch import ImageBatch
    from ddengine.runtime.conditioning import class_conditioning

    model = load_model(cond_model if num_classes else uncond_model)
    spec = model.spec
    profile = spec.batch_profile((1, 4, 8))
    assert profile["batch"] == [1, 4, 8]
    lo, _, hi = profile["engine_batch"]
    plan = make_plan(spec.schedule, 2)
    backend = create_backend("ort-cpu", model)
    for n in (1, 8):
        batch = ImageBatch(backend, spec, n)
        classes = np.arange(n) % 4 if num_classes else None
        conditioning = class_conditioning(spec, classes, guidance, n)
        batch.admit(plan, np.arange(n, dtype=np.uint64), conditioning, [None] * n)
        assert lo <= batch.rows <= hi
        assert batch.rows == (2 * n if guidance == 2.0 else n)
    assert hi == 8 * spec.cfg_factor  # and no more: the profile's max is what a full guided batch needs


def test_schedule_is_parsed_once_from_the_scheduler_dict():
    spec = tiny_spec(scheduler={**SCHEDULER, "prediction_type": "v_prediction", "num_train_timesteps": 20})
    assert spec.schedule is spec.schedule
    assert (spec.schedule.prediction_type, spec.schedule.num_train_timesteps) == ("v_prediction", 20)


def test_tensor_spec_shapes():
    t = TensorSpec("sample", "float32", (DYNAMIC, 3, 8, 8))
    assert t.at(5) == (5, 3, 8, 8) and not t.scalar
    assert TensorSpec("timestep", "int64", ()).scalar and TensorSpec("timestep", "int64", ()).at(7) == ()
    assert TensorSpec("x", "float32", (2, DYNAMIC)).at(9) == (2, DYNAMIC)  # only the leading axis is the batch


def test_from_json_refusals():
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        ModelSpec.from_json("{")
    with pytest.raises(ModelSpecError, match="must be a JSON object, got str"):
        ModelSpec.from_json('"spec"')
    with pytest.raises(ModelSpecError, match=r"format_version None is not supported \(expected 1\)"):
        ModelSpec.from_json(json.dumps({"channels": 1}))
    with pytest.raises(ModelSpecError, match="lacks scheduler, height"):
        ModelSpec.from_json(json.dumps({"format_version": 1, "channels": 1, "width": 8}))


def test_metadata_nested_too_deep_is_a_clear_error():
    with pytest.raises(ModelSpecError, match="metadata is nested more than 32 levels deep"):
        ModelSpec.from_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelSpecError, match="metadata holds a string of 100,000 characters"):
        ModelSpec.from_json(json.dumps({"format_version": 1, "prediction_type": "x" * 100_000}))
