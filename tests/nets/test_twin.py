"""ddengine.nets.twin: the torch twin round-trips bit for bit; anything that is not a twin is a clear TwinError."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from ddengine.nets.twin import TwinError, load_twin, save_twin, twin_path  # noqa: E402
from ddengine.nets.unet import UNet  # noqa: E402
from tests.support.export_helpers import randomized, tiny_config  # noqa: E402


def inputs(channels=1, size=16, classes=3, batch=3):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, channels, size, size, generator=g),
        torch.tensor([0, 417, 999][:batch]),
        torch.arange(batch) % (classes + 1),
    )


def test_twin_path_sits_next_to_the_onnx_file(tmp_path):
    assert twin_path(tmp_path / "models" / "default.onnx") == tmp_path / "models" / "default.safetensors"


def test_ddengine_unet_round_trip(tmp_path):
    module = randomized(UNet(tiny_config()))
    save_twin(tmp_path / "m.safetensors", module)
    assert os.listdir(tmp_path) == ["m.safetensors"]  # written atomically: no temp file left
    twin = load_twin(tmp_path / "m.safetensors")
    assert isinstance(twin, UNet) and not twin.training and twin.config == module.config
    with torch.no_grad():
        want, got = module(*inputs()), twin(*inputs())
    assert want.abs().max() > 1e-2
    assert torch.equal(got, want)
    for key, value in module.state_dict().items():
        assert torch.equal(twin.state_dict()[key], value), key


def test_diffusers_unet_round_trip(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DModel

    from ddengine.nets.diffusers_unet import DiffusersUNet

    torch.manual_seed(0)
    unet = randomized(
        UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            layers_per_block=1,
            block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4,
            num_class_embeds=4,
        ),
        scale=0.05,
    )
    module = DiffusersUNet(unet).eval()
    save_twin(tmp_path / "d.safetensors", module)
    twin = load_twin(tmp_path / "d.safetensors")
    x, t, y = inputs(size=8)
    with torch.no_grad():
        want = unet(x, t, class_labels=y).sample  # diffusers itself is the oracle
        got = twin(x, t, y)
    assert torch.equal(got, want) and isinstance(twin, DiffusersUNet) and not twin.training


def test_a_foreign_safetensors_file_is_a_clear_twin_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(
        TwinError, match=r"foreign.safetensors is not a ddengine U-Net twin \(no 'ddengine_twin' metadata"
    ):
        load_twin(tmp_path / "foreign.safetensors")
    save_file(
        {"weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"), metadata={"ddengine_twin": '{"format": 99}'}
    )
    with pytest.raises(TwinError, match="is not a ddengine U-Net twin"):
        load_twin(tmp_path / "other.safetensors")


def test_a_training_checkpoint_is_not_a_twin(tmp_path):
    from ddengine.export import checkpoint

    module = UNet(tiny_config())
    checkpoint.save(
        tmp_path / "last.safetensors",
        model=module,
        ema=module,
        optimizer=torch.optim.AdamW(module.parameters()),
        meta={"step": 1},
    )
    with pytest.raises(TwinError, match="is not a ddengine U-Net twin"):
        load_twin(tmp_path / "last.safetensors")


def test_weights_that_do_not_fit_the_config_are_a_clear_twin_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    save_twin(tmp_path / "small.safetensors", UNet(tiny_config()))
    save_twin(tmp_path / "wide.safetensors", UNet(tiny_config(base_channels=16, head_channels=32)))
    with safe_open(str(tmp_path / "wide.safetensors"), framework="pt") as fh:
        wide_header = fh.metadata()
    save_file(load_file(str(tmp_path / "small.safetensors")), str(tmp_path / "mixed.safetensors"), metadata=wide_header)
    with pytest.raises(TwinError, match=r"(?s)mixed.safetensors: not a usable ddengine U-Net twin: .*size mismatch"):
        load_twin(tmp_path / "mixed.safetensors")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\xff" * 64])
def test_garbage_and_missing_files_are_clear_twin_errors(tmp_path, content):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(TwinError, match=r"bad.safetensors"):
        load_twin(tmp_path / "bad.safetensors")
    with pytest.raises(
        TwinError,
        match=r"torch twin .*missing.safetensors does not exist or is not a file \(`ddengine export` writes it",
    ):
        load_twin(tmp_path / "missing.safetensors")


def test_the_twin_computes_what_its_onnx_export_computes(tmp_path):
    """export_with_twin (the tests' exporter) writes m.onnx and m.safetensors; both are the same function."""
    from ddengine.backends import create_backend
    from ddengine.model.load import load_model
    from tests.support.export_helpers import export_with_twin

    path, _ = export_with_twin(tmp_path)
    twin = load_twin(twin_path(path))
    x, t, y = inputs(size=8)
    with torch.no_grad():
        want = twin(x, t, y).numpy()
    backend = create_backend("ort-cpu", load_model(path))
    got = backend.run({"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()}, np.empty_like(want))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
