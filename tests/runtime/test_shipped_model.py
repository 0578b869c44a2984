"""The shipped default model (engine/models/default.onnx) through the Python API, as the README shows it."""

import hashlib

import numpy as np
import pytest

from ddengine.model.load import default_model_path


def test_default_model_is_installed_as_package_data():
    assert default_model_path().is_file(), f"the install lacks the shipped model {default_model_path()} (package data)"


@pytest.fixture(scope="module")
def sampler():
    from ddengine import Sampler

    return Sampler()


@pytest.fixture(scope="module")
def readme(sampler):
    """The README's Python API example, verbatim."""
    return sampler.sample(
        16, steps=50, method="ddim", eta=0.0, seed=0, classes=[0, 1, 2, 3], guidance=1.5, batch_size=16
    )


def test_the_default_backend_is_the_one_auto_chooses_here(sampler, readme):
    from ddengine.backends import auto_choice

    choice = auto_choice()
    assert (sampler.backend.name, sampler.backend.precision) == (choice.name, choice.precision)
    assert {(r["backend"], r["precision"]) for r in readme[1]} == {(choice.name, choice.precision)}


def test_default_model_is_self_describing(sampler):
    spec = sampler.spec
    assert (spec.channels, spec.height, spec.width, spec.num_classes, spec.null_class) == (1, 32, 32, 10, 10)
    assert sampler.model.path == default_model_path()
    assert sampler.model.sha256 == hashlib.sha256(default_model_path().read_bytes()).hexdigest()


@pytest.mark.slow
def test_the_readme_example_runs(readme):
    images, records = readme
    assert images.shape == (16, 32, 32, 1) and images.dtype == np.uint8
    assert [(r["seed"], r["class"], r["status"]) for r in records] == [(i, i % 4, "ok") for i in range(16)]
    assert all(r["guidance"] == 1.5 and r["steps"] == 50 and r["method"] == "ddim" for r in records)
    assert len({images[i].tobytes() for i in range(16)}) == 16 and 20 < images.mean() < 235  # images, not a constant


@pytest.mark.slow
def test_the_readme_images_do_not_depend_on_the_batch_size(sampler, readme):
    from ddengine.backends.base import probe_batch_invariance

    if not probe_batch_invariance(sampler.backend, sampler.spec):
        pytest.skip(f"{sampler.backend.name} ({sampler.backend.precision}) is not batch-invariant on this machine")
    images, _ = readme
    again, _ = sampler.sample(2, steps=50, seeds=[5, 14], classes=[1, 2], guidance=1.5, batch_size=1)
    assert np.array_equal(again, images[[5, 14]])


def test_default_model_samples_deterministically_and_batch_invariantly():
    from ddengine import Sampler

    exact = Sampler(backend="ort-cpu")
    a, records = exact.sample(3, steps=3, seed=1, classes=[0, 1, 2], guidance=2.0, batch_size=3)
    b, _ = exact.sample(3, steps=3, seed=1, classes=[0, 1, 2], guidance=2.0, batch_size=1)
    assert [r["status"] for r in records] == ["ok"] * 3
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])


def test_the_shipped_models_recommended_sampler_is_the_one_its_measurement_picks():
    """bench/bench_steps.py's rule over the committed FID grid gives the pair the metadata stores, and requests that
    give neither steps nor method use it."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec_ = importlib.util.spec_from_file_location("bench_steps", root / "bench" / "bench_steps.py")
    bench_steps = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench_steps)
    grid = json.loads((root / "bench" / "results" / "steps_amd-epyc.json").read_text())
    picked = bench_steps.recommended(grid["rows"])
    from ddengine import Sampler

    sampler = Sampler()
    assert (sampler.spec.recommended_method, sampler.spec.recommended_steps) == (picked["method"], picked["steps"])
    request = sampler.request(1, classes=7)
    assert (request.method, request.steps) == (picked["method"], picked["steps"])
    assert sampler.spec.class_names[7] == "Sneaker"
