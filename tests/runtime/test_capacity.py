"""The capacity checks: a request's forward and kept images against the memory this machine has (the estimate
comes from the graph's live activations), a backend's row limit, and the thread count against the usable CPUs."""

import re

import numpy as np
import onnx
import pytest

from ddengine.model.load import load_model
from ddengine.runtime import capacity
from ddengine.runtime.capacity import activation_bytes_per_row, check_memory, human_bytes, parse_threads, usable_cpus
from ddengine.runtime.params import InvalidParameterError, SamplingParams
from tests.support.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("capacity")
    build_tiny_model(root / "cond.onnx", channels=3, num_classes=4, recommended_guidance=2.5)
    return {"cond": load_model(root / "cond.onnx")}


def make_request(spec, n, *, batch_size=16, **fields):
    return SamplingParams.build(n=n, **fields).bind(spec, batch_size)


def _estimate(message):
    """The bytes a refusal names ('needs about 72.3 KiB for its forward')."""
    value, unit = re.search(r"needs about ([\d.]+) (B|KiB|MiB|GiB)", message).groups()
    return float(value) * 1024 ** ("B", "KiB", "MiB", "GiB").index(unit)


def test_memory_refusal_names_the_estimate_and_the_available_bytes(models, monkeypatch):
    model = models["cond"]
    monkeypatch.setattr(capacity, "available_memory", lambda: 1000)
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
    monkeypatch.setattr(capacity, "available_memory", lambda: 1)
    with pytest.raises(InvalidParameterError) as err:
        check_memory(model, request)
    estimate = _estimate(str(err.value))
    monkeypatch.setattr(capacity, "available_memory", lambda: int(estimate * 1.01) + 1)
    check_memory(model, request)  # just above the estimate: accepted
    monkeypatch.setattr(capacity, "available_memory", lambda: int(estimate * 0.99))
    with pytest.raises(InvalidParameterError):
        check_memory(model, request)
    monkeypatch.setattr(capacity, "available_memory", lambda: None)  # unknown: never refused on memory
    check_memory(model, make_request(model.spec, 10**6, batch_size=10**6), keep_images=True)


def test_memory_refusal_through_the_sampler_runs_nothing(cond_model, monkeypatch):
    from ddengine.runtime.sampler import Sampler

    sampler = Sampler(cond_model, backend="ort-cpu")
    monkeypatch.setattr(capacity, "available_memory", lambda: 4096)
    monkeypatch.setattr(sampler.backend, "run", lambda *a: pytest.fail("a forward ran before the memory check"))
    with pytest.raises(InvalidParameterError, match=r"needs about .* this machine has 4.0 KiB available"):
        sampler.sample(64, steps=2, classes=1, guidance=2.0, batch_size=64)


def test_backend_row_limit(models):
    request = make_request(models["cond"].spec, 8, classes=1, guidance=3.0, batch_size=8)
    with pytest.raises(
        InvalidParameterError, match=r"batch_size 8 needs 16 forward rows; this backend takes at most 12"
    ):
        check_memory(models["cond"], request, backend_rows=12)
    check_memory(models["cond"], request, backend_rows=16)


def test_threads_are_bounded_by_the_usable_cpus():
    assert parse_threads(None) is None and parse_threads(1) == 1
    with pytest.raises(
        InvalidParameterError, match=rf"threads must be in \[1, {usable_cpus()}\], got {usable_cpus() + 1}"
    ):
        parse_threads(usable_cpus() + 1)


def test_activation_estimate_bounds_the_forwards_memory(cond_model):
    """At least the row's float input and output, at most every float value of the graph alive at once."""
    model = load_model(cond_model)
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(cond_model)))
    per_row = {}
    for value in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]:
        t = value.type.tensor_type
        if t.elem_type == onnx.TensorProto.FLOAT:
            per_row[value.name] = 4 * int(np.prod([d.dim_value for d in t.shape.dim[1:]]))
    image = 4 * model.spec.per_image
    assert 2 * image <= activation_bytes_per_row(model) <= sum(per_row.values())
    assert activation_bytes_per_row(model) < sum(per_row.values())  # values die after their last use
