"""pipeline.json bound to the graphs of its folder at load (engine/text/binding.py): a folder whose fields disagree
with its graphs, or whose parts are swapped, is refused by name before any part runs; one whose graphs leave a
dimension open, or agree with it, samples."""

import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ddengine import Sampler  # noqa: E402
from ddengine.model.pipeline_spec import PipelineSpecError  # noqa: E402
from ddengine.text import parts  # noqa: E402
from ddengine.text.pipeline import read_text_model  # noqa: E402
from tests.support.tiny_pipeline import IMAGE, TEXT_LENGTH, tiny_sd  # noqa: E402,F401
from tests.text.broken_folders import BROKEN, text_encoder  # noqa: E402


@pytest.fixture
def model_copy(tiny_sd, tmp_path):
    """A throwaway copy of the exported MODEL_DIR, to break."""
    return shutil.copytree(tiny_sd.model, tmp_path / "model")


@pytest.mark.parametrize("case", BROKEN)
def test_a_folder_its_graphs_disagree_with_is_refused_before_any_part_runs(model_copy, monkeypatch, case):
    damage, message = BROKEN[case]
    damage(model_copy)
    monkeypatch.setattr(parts.OnnxPart, "__init__", lambda *a, **k: pytest.fail("a part was opened"))
    with pytest.raises(PipelineSpecError) as err:
        Sampler(model_copy, backend="ort-cpu")
    assert str(err.value) == message


def test_the_exported_folder_binds_and_samples(tiny_sd):
    model = read_text_model(tiny_sd.model)
    assert [t.name for t in model.signatures["text_encoder"].inputs] == ["input_ids"]
    assert model.unet.spec.io["encoder_hidden_states"].shape == (-1, TEXT_LENGTH, 32)
    with Sampler(tiny_sd.model, backend="ort-cpu") as s:
        images, records = s.sample(2, steps=2, prompt=["a cat", "a dog"], guidance=7.5)
    assert images.shape == (2, IMAGE, IMAGE, 3) and [r["status"] for r in records] == ["ok", "ok"]


def test_a_text_encoder_with_an_open_sequence_length_binds_and_samples(model_copy):
    """A dimension the graph leaves open is not checked against pipeline.json: it is what the runtime feeds."""
    text_encoder(model_copy / "text_encoder.onnx", length="sequence")
    assert read_text_model(model_copy).signatures["text_encoder"].inputs[0].shape == (-1, -1)
    with Sampler(model_copy, backend="ort-cpu") as s:
        images, _ = s.sample(1, steps=2, prompt="a cat")
    assert images.shape == (1, IMAGE, IMAGE, 3) and np.ptp(images) > 0
