"""A saved diffusers UNet2DModel (+ scheduler_config.json) -> the same self-describing ONNX as our own U-Net."""

from pathlib import Path

from ddengine.files.bounded_json import read_bounded_json
from ddengine.nets.twin import save_twin, twin_path

from .onnx_export import export_module, spec_for

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownsampleBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpsampleBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)


class DiffusersExportError(ValueError):
    """The folder is not a diffusers UNet2DModel we can export, or its scheduler config is unusable."""


def find_folders(folder):
    """(unet folder, scheduler_config.json path): a model folder itself, or a pipeline folder with unet/ and scheduler/."""
    folder = Path(folder)
    for unet_dir in (folder, folder / "unet"):
        if (unet_dir / "config.json").is_file():
            for sched in (
                unet_dir / "scheduler_config.json",
                folder / "scheduler_config.json",
                folder / "scheduler" / "scheduler_config.json",
            ):
                if sched.is_file():
                    return unet_dir, sched
            raise DiffusersExportError(f"{folder}: no scheduler_config.json next to the model or under scheduler/")
    raise DiffusersExportError(
        f"{folder}: no config.json of a diffusers UNet2DModel (looked in {folder} and {folder / 'unet'})"
    )


def check_config(cfg):
    """Reject what the ONNX contract cannot express, naming the field, the value and what is supported."""
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise DiffusersExportError(f"model class {cfg['_class_name']!r} is not supported (expected 'UNet2DModel')")
    for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        bad = [b for b in cfg.get(key, ()) if b not in allowed]
        if bad:
            raise DiffusersExportError(f"{key} {bad} not supported (supported: {', '.join(allowed)})")
    if cfg.get("mid_block_type", "UNetMidBlock2D") not in MID_BLOCKS:
        raise DiffusersExportError(
            f"mid_block_type {cfg['mid_block_type']!r} not supported (supported: UNetMidBlock2D or none)"
        )
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise DiffusersExportError(
            f"time_embedding_type {cfg['time_embedding_type']!r} not supported (expected 'positional': integer timesteps)"
        )
    if cfg.get("class_embed_type") is not None:
        raise DiffusersExportError(
            f"class_embed_type {cfg['class_embed_type']!r} not supported (expected null with num_class_embeds)"
        )
    cin, cout = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if cout != cin:
        raise DiffusersExportError(
            f"out_channels {cout} != in_channels {cin} (learned variance or a different output) is not supported"
        )


def scheduler_from(path, num_train_timesteps=None):
    """The scheduler_config.json as a validated diffusers-keys dict (ddengine.core.schedule)."""
    from ddengine.core.schedule import SOLVER_KEYS, SchedulerConfig, SchedulerConfigError

    try:
        raw = read_bounded_json(path, f"scheduler config {path}")
        return {**SchedulerConfig.from_dict(raw).to_dict(), **{k: raw[k] for k in SOLVER_KEYS if k in raw}}
    except (OSError, ValueError, SchedulerConfigError, TypeError) as err:  # ValueError: bad JSON
        raise DiffusersExportError(f"{path}: unusable scheduler config: {err}") from None


def export_diffusers(folder, out_path, fp16=False):
    """`ddengine export --diffusers DIR -o OUT`: class ids 0..K-2 are classes and K-1 the null class (K = num_class_embeds)."""
    unet_dir, sched_path = find_folders(folder)
    try:
        cfg = read_bounded_json(unet_dir / "config.json", "config.json")
    except (OSError, ValueError) as err:
        raise DiffusersExportError(f"{unet_dir / 'config.json'}: {err}") from None
    check_config(cfg)
    scheduler = scheduler_from(sched_path)
    from diffusers import UNet2DModel

    from ddengine.nets.diffusers_unet import DiffusersUNet

    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir)).eval()
    except (OSError, ValueError, RuntimeError) as err:
        raise DiffusersExportError(f"{unet_dir}: cannot load the UNet2DModel: {err}") from None
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    k = unet.config.num_class_embeds or 0
    if k == 1:
        raise DiffusersExportError("num_class_embeds 1 leaves no real class besides the null class (expected >= 2)")
    spec = spec_for(scheduler, unet.config.in_channels, height, width, max(k - 1, 0))
    module = DiffusersUNet(unet).eval()
    errors = export_module(module, spec, out_path, fp16=fp16)
    save_twin(twin_path(out_path), module)
    return errors
