"""SamplingParams, the one request schema: every field checked (expected vs given), then bound to a model's spec
(classes, prompts, guidance and steps against what the model takes)."""

import numpy as np
import pytest

from ddengine.core.plan import METHODS
from ddengine.model.load import load_model
from ddengine.runtime.params import InvalidParameterError, SamplingParams
from tests.support.tiny_models import build_tiny_model


def make_request(spec, n, *, batch_size=16, trajectory=False, **fields):
    """The Request of these SamplingParams fields on a model's spec."""
    return SamplingParams.build(n=n, **fields).bind(spec, batch_size, trajectory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """cond: 4 classes + null class 4, recommended guidance 2.5; plain: 3 classes, no recommended guidance; uncond."""
    root = tmp_path_factory.mktemp("requests")
    build_tiny_model(root / "cond.onnx", channels=3, num_classes=4, recommended_guidance=2.5)
    build_tiny_model(root / "plain.onnx", num_classes=3)
    build_tiny_model(root / "uncond.onnx")
    return {name: load_model(root / f"{name}.onnx") for name in ("cond", "plain", "uncond")}


@pytest.fixture(scope="module")
def cond(models):
    return models["cond"].spec


@pytest.mark.parametrize(
    "classes, n, want",
    [
        (2, 3, [2, 2, 2]),
        (np.int64(3), 2, [3, 3]),
        ([0, 1], 5, [0, 1, 0, 1, 0]),  # a list is cycled over the images
        ([3, 1, 2], 2, [3, 1]),
        (np.array([1, 0, 3]), 4, [1, 0, 3, 1]),
        ((2,), 3, [2, 2, 2]),
        ("all", 6, [0, 1, 2, 3, 0, 1]),  # "all": every class in turn
        ("all", 2, [0, 1]),
    ],
)
def test_classes_int_list_cycled_and_all(cond, classes, n, want):
    request = make_request(cond, n, classes=classes)
    assert request.classes[:].dtype == np.int64 and request.classes[:].tolist() == want


@pytest.mark.parametrize(
    "classes, message",
    [
        ([], "classes must be an int, a non-empty list of ints or 'all', got an empty list"),
        (4, "class must be in [0, 3], got 4"),  # 4 is the null class: not a class one can ask for
        (-1, "class must be in [0, 3], got -1"),
        ([0, 9], "class must be in [0, 3], got 9"),
        ("some", "classes must be an int, a non-empty list of ints or 'all', got 'some'"),
        (1.5, "classes must be an int, a non-empty list of ints or 'all', got 1.5"),
        (True, "classes must be an int, a non-empty list of ints or 'all', got True"),
        ([1.0], "class must be an integer, got 1.0"),
        ([False], "class must be an integer, got False"),
        (None, None),
    ],
)
def test_bad_classes_are_refused_naming_what_was_given(cond, classes, message):
    if message is None:  # None is fine on a model with a null class: it samples the null class
        assert make_request(cond, 2, classes=classes).classes is None
        return
    with pytest.raises(InvalidParameterError) as err:
        make_request(cond, 2, classes=classes)
    assert message in str(err.value)


def test_classes_on_an_unconditional_model(models):
    with pytest.raises(InvalidParameterError, match=r"classes=1 given but the model is unconditional"):
        make_request(models["uncond"].spec, 2, classes=1)
    with pytest.raises(InvalidParameterError, match="needs a class-conditional model with a null class"):
        make_request(models["uncond"].spec, 2, guidance=2.0)


def test_numpy_integers_are_accepted_everywhere(cond):
    request = make_request(
        cond,
        np.int64(2),
        steps=np.int32(4),
        seed=np.uint64(7),
        batch_size=np.int16(8),
        classes=[np.int64(1), np.int8(2)],
    )
    assert (request.n, request.steps, request.batch_size) == (2, 4, 2)  # batch_size is capped at n
    assert all(type(v) is int for v in (request.steps, request.batch_size))
    assert request.seeds[:].tolist() == [7, 8] and request.seeds[:].dtype == np.uint64
    assert make_request(cond, 2, seeds=np.array([5, 2**64 - 1], dtype=np.uint64)).seeds[:].tolist() == [5, 2**64 - 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seed=1, seeds=[1, 2]), "pass seed or seeds, not both"),
        (dict(seed=np.int64(3), seeds=[1, 2]), "pass seed or seeds, not both"),
        (dict(seeds=[1]), "seeds must have n = 2 entries, got 1"),
        (dict(seeds="12"), "seeds must be a list of n integers (one per image), got '12'"),
        (dict(seeds=[1, -1]), "each seed must be in [0, 18446744073709551615], got -1"),
        (dict(seeds=[1, 2.0]), "each seed must be an integer, got 2.0"),
        (
            dict(seed=2**64 - 1),
            "seed must be in [0, 18446744073709551614], got 18446744073709551615",
        ),  # seed + 1 overflows
        (dict(seed=True), "seed must be an integer, got True"),
    ],
)
def test_seed_refusals(cond, kwargs, message):
    with pytest.raises(InvalidParameterError) as err:
        make_request(cond, 2, **kwargs)
    assert message in str(err.value)


def test_seed_and_seeds_give_the_same_request(cond):
    assert (
        make_request(cond, 3, seed=10).seeds[:].tolist() == make_request(cond, 3, seeds=[10, 11, 12]).seeds[:].tolist()
    )


def test_guidance_defaults_to_the_recommended_one_only_with_classes(models, cond):
    assert make_request(cond, 2, classes=1).guidance == 2.5
    assert make_request(cond, 2, classes="all", guidance=None).guidance == 2.5
    assert make_request(cond, 2).guidance is None  # no classes: the null class, unguided
    assert make_request(cond, 2, classes=1, guidance=0).guidance == 0.0  # an explicit value wins, 0 included
    assert make_request(models["plain"].spec, 2, classes=1).guidance is None  # no recommendation: no guidance
    with pytest.raises(InvalidParameterError, match=r"guidance=1.5 needs classes"):
        make_request(cond, 2, guidance=1.5)


def test_steps_and_method_default_to_the_models_recommended_pair_only_when_neither_is_given(tmp_path, cond):
    build_tiny_model(
        tmp_path / "r.onnx", num_classes=2, meta={"recommended_method": "dpmpp-2m", "recommended_steps": 12}
    )
    spec = load_model(tmp_path / "r.onnx").spec
    schedule = lambda **f: (lambda r: (r.method, r.steps))(make_request(spec, 1, **f))  # noqa: E731
    assert schedule() == ("dpmpp-2m", 12)
    assert schedule(steps=30) == ("ddim", 30)  # one given: the other takes the engine's default
    assert schedule(method="unipc") == ("unipc", 50)
    assert schedule(eta=1.0) == ("ddim", 50)  # eta is a DDIM option: not the recommended solver
    assert (make_request(cond, 1).method, make_request(cond, 1).steps) == ("ddim", 50)  # no recommendation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n=0), "n must be in [1, 10000000], got 0"),
        (dict(n=2.0), "n must be an integer, got 2.0"),
        (dict(steps=0), "steps must be >= 1, got 0"),
        (dict(steps=1001), "steps must be in [1, 1000], got 1001"),
        (dict(steps=True), "steps must be an integer, got True"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(eta=-0.1), "eta must be a finite number >= 0, got -0.1"),
        (dict(eta=float("inf")), "eta must be a finite number >= 0, got inf"),
        (
            dict(method="heun"),
            "method must be one of 'ddim', 'ddpm', 'dpmpp-2m', 'dpmpp-3m', 'unipc', 'euler', 'euler-a', 'plms', got 'heun'",
        ),
        (dict(method="ddpm", eta=0.5), "eta applies to method 'ddim' only; got eta=0.5 with method 'ddpm'"),
        (dict(spacing="karras"), "spacing must be one of 'leading', 'trailing', 'linspace', got 'karras'"),
        (dict(classes=1, guidance=-1), "guidance must be a finite number >= 0, got -1"),
        (dict(classes=1, guidance=float("nan")), "guidance must be a finite number >= 0, got nan"),
        (dict(trajectory=0), "trajectory must be >= 1, got 0"),
    ],
)
def test_out_of_range_parameters_name_expected_and_given(cond, kwargs, message):
    kwargs.setdefault("n", 2)
    with pytest.raises(InvalidParameterError) as err:
        make_request(cond, **kwargs)
    assert message in str(err.value)


def test_steps_are_bounded_by_the_models_training_length(tmp_path):
    build_tiny_model(tmp_path / "t50.onnx", scheduler={"num_train_timesteps": 50})
    spec = load_model(tmp_path / "t50.onnx").spec
    assert make_request(spec, 1, steps=50).steps == 50
    with pytest.raises(InvalidParameterError, match=r"steps must be in \[1, 50\], got 51"):
        make_request(spec, 1, steps=51)


def test_every_bad_field_is_named_in_one_message():
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams.build(n=2.0, steps=0, colour="red")
    assert str(err.value) == (
        "n must be an integer, got 2.0; steps must be >= 1, got 0; unknown field 'colour' "
        "(expected some of: n, steps, method, eta, seed, seeds, classes, guidance, spacing, prompt, "
        "negative_prompt, image, strength, mask, latents)"
    )


def test_the_json_schema_is_the_fields_with_their_defaults_and_bounds():
    schema = SamplingParams.model_json_schema()
    assert schema["additionalProperties"] is False and schema["title"] == "SamplingParams"
    props = schema["properties"]
    assert list(props) == [
        "n",
        "steps",
        "method",
        "eta",
        "seed",
        "seeds",
        "classes",
        "guidance",
        "spacing",
        "prompt",
        "negative_prompt",
        "image",
        "strength",
        "mask",
        "latents",
    ]
    assert props["steps"]["default"] is None and props["steps"]["anyOf"][0]["minimum"] == 1
    assert "recommended steps" in props["steps"]["description"]
    assert props["method"]["anyOf"][0]["enum"] == list(METHODS) and props["spacing"]["anyOf"][0]["enum"] == [
        "leading",
        "trailing",
        "linspace",
    ]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n=2, seeds={1, 2}), "seeds must be a list of n integers (one per image), got {1, 2}"),  # no order
        (dict(n=2, seeds={1: 0, 2: 0}), "seeds must be a list of n integers (one per image), got {1: 0, 2: 0}"),
        (dict(classes={1, 2}), "classes must be an int, a non-empty list of ints or 'all', got {1, 2}"),
        (dict(classes=frozenset([1])), "classes must be an int, a non-empty list of ints or 'all', got frozenset({1})"),
        (dict(n=2**63), "n must be in [1, 10000000], got 9223372036854775808"),  # refused before any allocation
        (dict(n=10**5000), "n must be in [1, 10000000], got <an integer of about 5000 digits>"),
    ],
)
def test_unordered_collections_and_huge_counts_are_refused_at_once(fields, message):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams.build(**fields)
    assert str(err.value) == message


def test_a_huge_value_is_quoted_cut_short_in_the_message():
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams.build(method="x" * 5_000_000)
    message = str(err.value)
    assert len(message) < 400 and message.endswith("... (5000002 characters)")


def test_constructing_it_directly_raises_the_same_error():
    with pytest.raises(InvalidParameterError, match=r"^n must be in \[1, 10000000\], got 0$"):
        SamplingParams(n=0)
    assert (
        SamplingParams(n=3, steps=4) == SamplingParams.build(n=3, steps=4) == SamplingParams.parse({"n": 3, "steps": 4})
    )


def test_a_prompt_that_is_not_valid_unicode_is_refused():
    prompt = b"a \xff cat".decode("utf-8", errors="surrogateescape")  # bytes read under a C locale
    with pytest.raises(
        InvalidParameterError,
        match=r"prompt must be valid Unicode text; 'a \\udcff cat' has a lone "
        r"surrogate at character 2",
    ):
        SamplingParams.build(prompt=prompt)


def test_the_largest_request_binds_without_making_its_per_image_values(cond):
    import tracemalloc

    from ddengine.runtime.params import MAX_IMAGES

    tracemalloc.start()
    request = make_request(cond, MAX_IMAGES, seed=5, classes=[3, 1, 2])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # eager seeds and labels would take 160 MB
    middle = slice(MAX_IMAGES // 2, MAX_IMAGES // 2 + 4)
    assert request.seeds[middle].tolist() == [5 + i for i in range(middle.start, middle.stop)]
    assert request.classes[middle].tolist() == [[3, 1, 2][i % 3] for i in range(middle.start, middle.stop)]
    assert int(request.seeds[-1]) == 5 + MAX_IMAGES - 1 and len(request.seeds) == request.n == MAX_IMAGES
    with pytest.raises(IndexError, match="image index 10000000 is out of range for 10000000 images"):
        request.seeds[MAX_IMAGES]
