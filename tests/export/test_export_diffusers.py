"""diffusers UNet2DModel folder -> ddengine ONNX: parity with diffusers itself, spec from scheduler_config.json, refusals."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ddengine.export.diffusers_export import DiffusersExportError, export_diffusers
from ddengine.model.spec import METADATA_KEY, ModelSpec
from tests.support.export_helpers import randomized

TINY = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=8,
    num_class_embeds=5,
)
SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "v_prediction",
    "clip_sample": True,
    "timestep_spacing": "trailing",
}


def save_tiny(folder, **overrides):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = randomized(UNet2DModel(**(TINY | overrides)), scale=0.05)
    unet.save_pretrained(str(folder))
    (folder / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return unet


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet2d")
    unet = save_tiny(folder)
    out = folder / "m.onnx"
    errors = export_diffusers(folder, out)
    return unet, out, errors


def test_onnx_matches_diffusers_forward(exported):
    unet, out, errors = exported
    assert errors["fp32"] <= 1e-4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    t = np.array([0, 400, 999], dtype=np.int64)
    y = np.array([0, 3, 4], dtype=np.int64)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(
        None, {"sample": x, "timestep": t, "class_labels": y}
    )[0]
    with torch.no_grad():
        want = unet(torch.from_numpy(x), torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_spec_comes_from_the_scheduler_config(exported):
    props = {p.key: p.value for p in onnx.load(str(exported[1])).metadata_props}
    spec = ModelSpec.from_json(props[METADATA_KEY])
    assert (spec.channels, spec.height, spec.width, spec.num_classes, spec.null_class) == (1, 8, 8, 4, 4)
    assert spec.schedule.prediction_type == "v_prediction" and spec.scheduler["timestep_spacing"] == "trailing"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"out_channels": 2}, "out_channels 2 != in_channels 1"),
        ({"down_block_types": ("DownBlock2D", "SkipDownBlock2D")}, "SkipDownBlock2D"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type 'fourier'"),
    ],
)
def test_unsupported_configurations_are_refused_before_export(tmp_path, overrides, message):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **TINY, **overrides}))
    (tmp_path / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    with pytest.raises(DiffusersExportError, match=message):
        export_diffusers(tmp_path, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(DiffusersExportError, match="no config.json"):
        export_diffusers(tmp_path, tmp_path / "m.onnx")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(DiffusersExportError, match="no scheduler_config.json"):
        export_diffusers(tmp_path, tmp_path / "m.onnx")


def test_the_export_writes_the_diffusers_twin_beside_the_onnx(exported):
    from ddengine.nets.twin import load_twin, twin_path

    unet, out, _ = exported
    twin = load_twin(twin_path(out))
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32))
    t, y = torch.tensor([3, 700]), torch.tensor([1, 4])
    with torch.no_grad():
        assert torch.equal(twin(x, t, y), unet(x, t, class_labels=y).sample)


def test_a_folders_solver_class_and_keys_are_kept_so_it_samples_with_its_own_scheduler(tmp_path):
    """Stable Diffusion 1.x's scheduler_config.json (PNDM, skip_prk_steps): the stored schedule selects plms."""
    from ddengine.core.solvers.classes import class_method
    from ddengine.export.diffusers_export import scheduler_from
    from tests.core.test_schedule import SD1_SCHEDULER

    (tmp_path / "scheduler_config.json").write_text(json.dumps(SD1_SCHEDULER))
    stored = scheduler_from(tmp_path / "scheduler_config.json")
    assert class_method(stored) == "plms" and stored["steps_offset"] == 1 and "_diffusers_version" not in stored
