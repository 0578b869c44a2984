"""ddengine.requests: the one set of request validators (classes, seeds, guidance, ranges) and the memory check."""
import re

import numpy as np
import pytest

from ddengine import requests
from ddengine.model import load_model
from ddengine.requests import InvalidParameterError, check_memory, make_request
from ddengine.resources import human_bytes
from tests.support.tiny_models import build_tiny_model


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


@pytest.mark.parametrize("classes, n, want", [
    (2, 3, [2, 2, 2]),
    (np.int64(3), 2, [3, 3]),
    ([0, 1], 5, [0, 1, 0, 1, 0]),  # a list is cycled over the images
    ([3, 1, 2], 2, [3, 1]),
    (np.array([1, 0, 3]), 4, [1, 0, 3, 1]),
    ((2,), 3, [2, 2, 2]),
    ("all", 6, [0, 1, 2, 3, 0, 1]),  # "all": every class in turn
    ("all", 2, [0, 1]),
])
def test_classes_int_list_cycled_and_all(cond, classes, n, want):
    request = make_request(cond, n, classes=classes)
    assert request.classes.dtype == np.int64 and request.classes.tolist() == want


@pytest.mark.parametrize("classes, message", [
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
])
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
    request = make_request(cond, np.int64(2), steps=np.int32(4), seed=np.uint64(7), batch_size=np.int16(8),
                           classes=[np.int64(1), np.int8(2)])
    assert (request.n, request.steps, request.batch_size) == (2, 4, 2)  # batch_size is capped at n
    assert all(type(v) is int for v in (request.steps, request.batch_size))
    assert request.seeds.tolist() == [7, 8] and request.seeds.dtype == np.uint64
    assert make_request(cond, 2, seeds=np.array([5, 2**64 - 1], dtype=np.uint64)).seeds.tolist() == [5, 2**64 - 1]


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=1, seeds=[1, 2]), "pass seed or seeds, not both"),
    (dict(seed=np.int64(3), seeds=[1, 2]), "pass seed or seeds, not both"),
    (dict(seeds=[1]), "seeds must have n = 2 entries, got 1"),
    (dict(seeds="12"), "seeds must be a list of n = 2 integers"),
    (dict(seeds=[1, -1]), "each seed must be in [0, 18446744073709551615], got -1"),
    (dict(seeds=[1, 2.0]), "each seed must be an integer, got 2.0"),
    (dict(seed=2**64 - 1), "seed must be in [0, 18446744073709551614], got 18446744073709551615"),  # seed + 1 overflows
    (dict(seed=True), "seed must be an integer, got True"),
])
def test_seed_refusals(cond, kwargs, message):
    with pytest.raises(InvalidParameterError) as err:
        make_request(cond, 2, **kwargs)
    assert message in str(err.value)


def test_seed_and_seeds_give_the_same_request(cond):
    assert make_request(cond, 3, seed=10).seeds.tolist() == make_request(cond, 3, seeds=[10, 11, 12]).seeds.tolist()


def test_guidance_defaults_to_the_recommended_one_only_with_classes(models, cond):
    assert make_request(cond, 2, classes=1).guidance == 2.5
    assert make_request(cond, 2, classes="all", guidance=None).guidance == 2.5
    assert make_request(cond, 2).guidance is None  # no classes: the null class, unguided
    assert make_request(cond, 2, classes=1, guidance=0).guidance == 0.0  # an explicit value wins, 0 included
    assert make_request(models["plain"].spec, 2, classes=1).guidance is None  # no recommendation: no guidance
    with pytest.raises(InvalidParameterError, match=r"guidance=1.5 needs classes"):
        make_request(cond, 2, guidance=1.5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(n=2.0), "n must be an integer, got 2.0"),
    (dict(steps=0), "steps must be in [1, 1000], got 0"),
    (dict(steps=1001), "steps must be in [1, 1000], got 1001"),
    (dict(steps=True), "steps must be an integer, got True"),
    (dict(batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(eta=-0.1), "eta must be a finite number >= 0, got -0.1"),
    (dict(eta=float("inf")), "eta must be a finite number >= 0, got inf"),
    (dict(method="euler"), "method must be one of 'ddim', 'ddpm', got 'euler'"),
    (dict(method="ddpm", eta=0.5), "eta applies to method 'ddim' only; got eta=0.5 with method 'ddpm'"),
    (dict(spacing="karras"), "spacing must be one of 'leading', 'trailing', 'linspace', got 'karras'"),
    (dict(classes=1, guidance=-1), "guidance must be a finite number >= 0, got -1"),
    (dict(classes=1, guidance=float("nan")), "guidance must be a finite number >= 0, got nan"),
    (dict(trajectory=0), "trajectory must be >= 1, got 0"),
])
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


def _estimate(message):
    """The bytes a refusal names ('needs about 72.3 KiB for its forward')."""
    value, unit = re.search(r"needs about ([\d.]+) (B|KiB|MiB|GiB)", message).groups()
    return float(value) * 1024 ** ("B", "KiB", "MiB", "GiB").index(unit)


def test_memory_refusal_names_the_estimate_and_the_available_bytes(models, monkeypatch):
    model = models["cond"]
    monkeypatch.setattr(requests, "available_memory", lambda: 1000)
    request = make_request(model.spec, 8, classes=1, guidance=2.0, batch_size=8)
    with pytest.raises(InvalidParameterError) as err:
        check_memory(model, request)
    message = str(err.value)
    assert "batch_size 8 needs about" in message and f"this machine has {human_bytes(1000)} available" in message
    estimate = _estimate(message)
    io_bytes = 16 * 2 * 4 * model.spec.per_image  # the guided forward's input and output rows, float32
    assert estimate >= io_bytes  # an estimate below the forward's own I/O would be no estimate at all
    with pytest.raises(InvalidParameterError) as err:
        check_memory(model, make_request(model.spec, 8, classes=1, guidance=1.0, batch_size=8))  # g = 1: one row each
    assert _estimate(str(err.value)) == pytest.approx(estimate / 2, rel=0.01)
    with pytest.raises(InvalidParameterError) as err:
        check_memory(model, make_request(model.spec, 16, classes=1, guidance=2.0, batch_size=16))
    assert _estimate(str(err.value)) == pytest.approx(2 * estimate, rel=0.01)
    with pytest.raises(InvalidParameterError, match=r"n = 8 images kept in memory need .*stream the images"):
        check_memory(model, request, keep_images=True)


def test_the_refusal_agrees_with_the_estimate_it_names(models, monkeypatch):
    model = models["cond"]
    request = make_request(model.spec, 8, classes=1, guidance=2.0, batch_size=8)
    monkeypatch.setattr(requests, "available_memory", lambda: 1)
    with pytest.raises(InvalidParameterError) as err:
        check_memory(model, request)
    estimate = _estimate(str(err.value))
    monkeypatch.setattr(requests, "available_memory", lambda: int(estimate * 1.01) + 1)
    check_memory(model, request)  # just above the estimate: accepted
    monkeypatch.setattr(requests, "available_memory", lambda: int(estimate * 0.99))
    with pytest.raises(InvalidParameterError):
        check_memory(model, request)
    monkeypatch.setattr(requests, "available_memory", lambda: None)  # unknown: never refused on memory
    check_memory(model, make_request(model.spec, 10**6, batch_size=10**6), keep_images=True)


def test_memory_refusal_through_the_sampler_runs_nothing(cond_model, monkeypatch):
    from ddengine.sampler import Sampler

    sampler = Sampler(cond_model, backend="ort-cpu")
    monkeypatch.setattr(requests, "available_memory", lambda: 4096)
    monkeypatch.setattr(sampler.backend, "run", lambda *a: pytest.fail("a forward ran before the memory check"))
    with pytest.raises(InvalidParameterError, match=r"needs about .* this machine has 4.0 KiB available"):
        sampler.sample(64, steps=2, classes=1, guidance=2.0, batch_size=64)


def test_backend_row_limit(models):
    request = make_request(models["cond"].spec, 8, classes=1, guidance=3.0, batch_size=8)
    with pytest.raises(InvalidParameterError, match=r"batch_size 8 needs 16 forward rows; this backend takes at most 12"):
        check_memory(models["cond"], request, backend_rows=12)
    check_memory(models["cond"], request, backend_rows=16)


def test_threads_are_bounded_by_the_usable_cpus():
    from ddengine.requests import parse_threads
    from ddengine.resources import usable_cpus

    assert parse_threads(None) is None and parse_threads(1) == 1
    with pytest.raises(InvalidParameterError, match=rf"threads must be in \[1, {usable_cpus()}\], got {usable_cpus() + 1}"):
        parse_threads(usable_cpus() + 1)
