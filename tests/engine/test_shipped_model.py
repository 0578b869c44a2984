"""The shipped default model (engine/models/default.onnx): sampled through the API and the CLI with no --model."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from ddengine.cli import main
from ddengine.model import default_model_path



def test_default_model_is_installed_as_package_data():
    assert default_model_path().is_file(), f"the install lacks the shipped model {default_model_path()} (package data)"


@pytest.fixture(scope="module")
def sampler():
    from ddengine import Sampler

    return Sampler()


def test_default_model_is_self_describing(sampler):
    spec = sampler.spec
    assert spec.channels >= 1 and spec.height >= 8 and spec.width >= 8
    assert sampler.model.path == default_model_path()


def test_default_model_samples_deterministically_and_batch_invariantly(sampler):
    classes = list(range(3)) if sampler.spec.conditional else None
    guidance = 2.0 if sampler.spec.conditional and sampler.spec.null_class is not None else None
    a, records = sampler.sample(3, steps=3, seed=1, classes=classes, guidance=guidance, batch_size=3)
    b, _ = sampler.sample(3, steps=3, seed=1, classes=classes, guidance=guidance, batch_size=1)
    assert [r["status"] for r in records] == ["ok"] * 3
    assert a.shape == (3, sampler.spec.height, sampler.spec.width, sampler.spec.channels)
    assert np.array_equal(a, b) and not np.array_equal(a[0], a[1])


def test_cli_samples_the_default_model(tmp_path):
    result = CliRunner().invoke(main, ["sample", "--n", "2", "--steps", "2", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "ok"] and (tmp_path / "00001.png").exists()


def test_info_defaults_to_the_shipped_model():
    result = CliRunner().invoke(main, ["info", "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert str(default_model_path()) in result.output
