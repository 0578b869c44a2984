"""Train the class-conditional epsilon-prediction U-Net (Ho et al. 2020, Algorithm 1) with label dropout for CFG."""

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ddengine.nets.unet import UNet, UNetConfig
from ddengine.quality.fashion_mnist import load as load_data

from . import checkpoint

LAST = "last.safetensors"
LOSS_LOG = "loss.tsv"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (stored in the checkpoint; a resumed run keeps them)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    seed: int = 0
    precision: str = "bf16"
    save_every: int = 500
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.05


def scheduler_dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000):
    """The diffusers-style scheduler_config the model is trained with (goes into the ONNX metadata); x0 unclipped.

    clip_sample=True (diffusers' default) clips x0 to [-1, 1] at every step; with guidance > 1 the combined eps
    makes x0 overshoot at high t, and clipping it there changes the class (README, "Training the default model").
    """
    if beta_schedule not in ("linear", "squaredcos_cap_v2"):
        raise ValueError(f"beta_schedule must be 'linear' or 'squaredcos_cap_v2', got {beta_schedule!r}")
    return {
        "num_train_timesteps": int(num_train_timesteps),
        "beta_schedule": beta_schedule,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "trained_betas": None,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "set_alpha_to_one": True,
        "variance_type": "fixed_small",
        "rescale_betas_zero_snr": False,
    }


def alphas_cumprod(scheduler):
    """abar_t for the training schedule, as the engine samples it (ddengine.core.schedule)."""
    from ddengine.core.schedule import SchedulerConfig

    return SchedulerConfig.from_dict(scheduler).alphas_cumprod()


def diffusion_loss(model, x0, labels, abar, generator, p_uncond, null_class):
    """E||eps - eps_theta(sqrt(abar) x0 + sqrt(1-abar) eps, t, y)||^2, with y -> null class w.p. p_uncond."""
    n = x0.shape[0]
    t = torch.randint(0, abar.shape[0], (n,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    a = abar[t].view(n, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    if null_class is not None:
        drop = torch.rand(n, generator=generator) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, null_class), labels)
    pred = model(xt, t, labels)
    return F.mse_loss(pred.float(), eps)


@torch.no_grad()
def ema_update(ema, model, decay, step):
    """EMA of the weights with the usual warm-up min(decay, (1+n)/(10+n))."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


def lr_at(step, cfg, total):
    """Linear warm-up, then constant or cosine decay to min_lr_ratio * lr at `total` (Loshchilov & Hutter 2017)."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def build(model_cfg, train_cfg):
    """Fresh model, EMA copy and AdamW."""
    torch.manual_seed(train_cfg.seed)
    model = UNet(model_cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return model, ema, opt


def resume(path):
    """(model_cfg, train_cfg, model, ema, opt, step) from a checkpoint."""
    meta, parts = checkpoint.load(path)
    try:
        model_cfg = UNetConfig.from_dict(meta["model_config"])
        train_cfg = TrainConfig(**meta["train_config"])
        model, ema, opt = build(model_cfg, train_cfg)
        model.load_state_dict(parts["model"])
        ema.load_state_dict(parts["ema"])
        opt.load_state_dict(parts["optim"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise checkpoint.CheckpointError(f"{path}: cannot restore the training state: {err}") from None
    return model_cfg, train_cfg, model, ema, opt, int(meta["step"])


def save(path, model_cfg, train_cfg, model, ema, opt, step, loss):
    """Checkpoint with everything `resume` and `export` need."""
    meta = {
        "model_config": asdict(model_cfg),
        "train_config": asdict(train_cfg),
        "step": step,
        "scheduler": scheduler_dict(train_cfg.beta_schedule, train_cfg.num_train_timesteps),
        "loss": loss,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    checkpoint.save(path, model=model, ema=ema, optimizer=opt, meta=meta)


def train(
    out_dir,
    model_cfg=None,
    train_cfg=None,
    data=None,
    data_path=None,
    resume_from=None,
    log=print,
    max_steps=None,
    max_seconds=None,
):
    """Run (or continue) training; checkpoints go to out_dir/last.safetensors. Returns the final mean loss."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        model_cfg, train_cfg, model, ema, opt, step = resume(resume_from)
        log(f"resumed {resume_from} at step {step}")
    else:
        model, ema, opt = build(model_cfg, train_cfg)
        step = 0
    x, y = data if data is not None else load_data("train", data_path, size=model_cfg.image_size)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    abar = torch.as_tensor(
        alphas_cumprod(scheduler_dict(train_cfg.beta_schedule, train_cfg.num_train_timesteps)), dtype=torch.float32
    )
    per_epoch = len(x) // train_cfg.batch_size
    planned = train_cfg.epochs * per_epoch
    total = planned if max_steps is None else min(max_steps, planned)
    log(
        f"{sum(p.numel() for p in model.parameters())} parameters, {per_epoch} steps/epoch, {total} steps, "
        f"precision {train_cfg.precision}"
    )
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    return _loop(out_dir, model_cfg, train_cfg, model, ema, opt, step, total, planned, x, y, abar, per_epoch, deadline)


def _log_losses(out_dir, first_step, losses):
    """Append one line per optimiser step (step, loss) to out_dir/loss.tsv: the run's reproducibility record."""
    with open(out_dir / LOSS_LOG, "a") as fh:
        fh.writelines(f"{first_step + i + 1}\t{loss:.6f}\n" for i, loss in enumerate(losses))


def _loop(out_dir, model_cfg, train_cfg, model, ema, opt, step, total, planned, x, y, abar, per_epoch, deadline=None):
    """The optimisation loop: one seeded permutation per epoch, so a resumed run replays the same batches."""
    from tqdm import tqdm

    model.train()
    bs, losses, unlogged = train_cfg.batch_size, [], []
    bar = tqdm(total=total, initial=step, mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_cfg.precision == "bf16")
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(train_cfg.seed * 100003 + epoch))
        gen = torch.Generator().manual_seed(train_cfg.seed * 1000003 + step)
        for i in range(offset, per_epoch):
            if step >= total:
                break
            idx = perm[i * bs : (i + 1) * bs]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, train_cfg, planned)
            with autocast:
                loss = diffusion_loss(model, x[idx], y[idx], abar, gen, train_cfg.p_uncond, model_cfg.null_class)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            ema_update(ema, model, train_cfg.ema_decay, step)
            losses.append(loss.item())
            unlogged.append(losses[-1])
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-100:]):.4f}")
            out_of_time = deadline is not None and time.monotonic() > deadline
            if step % train_cfg.save_every == 0 or step == total or out_of_time:
                _log_losses(out_dir, step - len(unlogged), unlogged)
                unlogged = []
                save(out_dir / LAST, model_cfg, train_cfg, model, ema, opt, step, float(np.mean(losses[-200:])))
            if out_of_time:
                bar.close()
                return float(np.mean(losses[-200:]))
    bar.close()
    return float(np.mean(losses[-200:])) if losses else float("nan")
