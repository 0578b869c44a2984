"""Training: the loss goes down on a fixed batch, checkpoints round-trip and resume, corruption is a clear error."""

import numpy as np
import pytest
import torch

from ddengine.export import checkpoint, train
from ddengine.nets.unet import UNet
from tests.support.export_helpers import tiny_config


def test_alphas_cumprod_matches_diffusers():
    from diffusers import DDPMScheduler

    for schedule in ("squaredcos_cap_v2", "linear"):
        want = DDPMScheduler(beta_schedule=schedule).alphas_cumprod.double().numpy()
        got = train.alphas_cumprod(train.scheduler_dict(schedule))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    cfg = train.TrainConfig(lr=2e-3, warmup_steps=1, precision="fp32")
    model, ema, opt = train.build(tiny_config(), cfg)
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    y = torch.arange(8) % 3
    abar = torch.as_tensor(train.alphas_cumprod(train.scheduler_dict()), dtype=torch.float32)

    def loss():
        return train.diffusion_loss(model, x, y, abar, torch.Generator().manual_seed(1), 0.0, 3)

    before = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * before


def test_label_dropout_uses_the_null_class():
    seen = []

    def model(xt, t, labels):
        seen.append(labels.clone())
        return torch.zeros_like(xt)

    abar = torch.linspace(0.99, 0.01, 10)
    train.diffusion_loss(
        model,
        torch.zeros(4000, 1, 2, 2),
        torch.zeros(4000, dtype=torch.long),
        abar,
        torch.Generator().manual_seed(0),
        0.1,
        7,
    )
    share = float((seen[0] == 7).float().mean())
    assert set(seen[0].tolist()) == {0, 7} and 0.08 < share < 0.12


def test_ema_update_is_the_convex_combination():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    want = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()  # step 1000: min(0.9, 1001/1010) = 0.9
    train.ema_update(a, b, 0.9, 1000)
    torch.testing.assert_close(a.weight.detach(), want)


def _fake_data(n=64):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).numpy(), (torch.arange(n) % 3).numpy()


def test_checkpoint_round_trip_and_resume(tmp_path):
    cfg = train.TrainConfig(epochs=1, batch_size=16, precision="fp32", save_every=2)
    train.train(tmp_path, tiny_config(), cfg, data=_fake_data(), log=lambda *_: None, max_steps=3)
    path = tmp_path / train.LAST
    meta, parts = checkpoint.load(path)
    assert meta["step"] == 3 and meta["scheduler"]["beta_schedule"] == "squaredcos_cap_v2"
    assert meta["model_config"]["base_channels"] == 8 and parts["optim"]["state"]
    model_cfg, train_cfg, model, ema, opt, step = train.resume(path)
    assert (model_cfg, train_cfg, step) == (tiny_config(), cfg, 3)
    for k, v in parts["ema"].items():
        torch.testing.assert_close(ema.state_dict()[k], v)
    assert opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    train.train(tmp_path, data=_fake_data(), resume_from=path, log=lambda *_: None, max_steps=4)
    assert checkpoint.load(path)[0]["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [train.LAST, train.LOSS_LOG]  # atomic: no temp files left
    logged = [line.split("\t") for line in (tmp_path / train.LOSS_LOG).read_text().splitlines()]
    assert [int(s) for s, _ in logged] == [1, 2, 3, 4] and all(float(v) > 0 for _, v in logged)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = train.TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    lrs = [train.lr_at(s, cfg, 100) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(1e-4)
    assert lrs[55] == pytest.approx(0.55e-3)  # halfway through the decay: the mean of peak and floor
    assert train.lr_at(99, train.TrainConfig(lr=1e-3, warmup_steps=10), 100) == 1e-3  # constant is the default


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    model = UNet(tiny_config())
    opt = torch.optim.AdamW(model.parameters())
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model=model, ema=model, optimizer=opt, meta={"step": 0})
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(path)


def test_foreign_and_garbage_files_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(checkpoint.CheckpointError, match="not a ddengine checkpoint"):
        checkpoint.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
        checkpoint.load(garbage)
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_checkpoint_of_another_shape_cannot_be_resumed(tmp_path):
    model = UNet(tiny_config())
    meta = {"model_config": dict(tiny_config().__dict__, base_channels=16), "train_config": {}, "step": 1}
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, model=model, ema=model, optimizer=torch.optim.AdamW(model.parameters()), meta=meta)
    with pytest.raises(checkpoint.CheckpointError, match="cannot restore"):
        train.resume(path)
