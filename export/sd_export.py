"""A diffusers StableDiffusionPipeline folder -> a ddengine text-to-image model folder (engine/model/pipeline_spec.py).

`ddengine export --diffusers PIPELINE_DIR -o MODEL_DIR [--fp16]` writes text_encoder.onnx, unet.onnx (with an
encoder_hidden_states input), vae_decoder.onnx, vae_encoder.onnx (image-to-image and inpainting: the posterior's
mean), tokenizer.json and pipeline.json into a temporary folder next to MODEL_DIR, verifies every part against torch
on ONNX Runtime, and only then renames the folder into place.
Parts too large for one protobuf (2 GB) keep their weights in ONNX external data (PART.onnx.data).
"""

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from ddengine.files.atomic import DIR_MODE
from ddengine.files.bounded_json import read_bounded_json
from ddengine.model.pipeline_spec import DEFAULT_FILES, OPTIONAL_FILES, PipelineSpec

from .onnx_export import ExportError, export_graph, spec_for, verify_file

RUN = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
IGNORED = ("safety_checker", "feature_extractor")  # not run by ddengine: left out of the exported folder
REFUSED = {
    "text_encoder_2": "SDXL's second text encoder",
    "tokenizer_2": "SDXL's second tokenizer",
    "image_encoder": "IP-Adapter's image encoder",
    "controlnet": "ControlNet",
    "transformer": "a diffusion transformer",
    "prior": "a prior model",
    "adapter": "a T2I-Adapter",
    "motion_adapter": "a motion adapter",
}
PIPELINES = ("StableDiffusionPipeline",)
ATOL = 1e-4
TEXT_LENGTH = 77
GUIDANCE = 7.5  # diffusers' StableDiffusionPipeline default guidance_scale: the U-Net's recommended_guidance


class PipelineExportError(ValueError):
    """The folder is not a StableDiffusionPipeline ddengine can run, or a part cannot be exported."""


def is_pipeline_folder(folder):
    """A diffusers pipeline folder has model_index.json."""
    return (Path(folder) / "model_index.json").is_file()


def read_index(folder):
    """model_index.json, checked: a StableDiffusionPipeline with the parts we run and none we do not."""
    path = Path(folder) / "model_index.json"
    try:
        index = read_bounded_json(path, "model_index.json")
    except (OSError, ValueError) as err:
        raise PipelineExportError(f"{path}: {err}") from None
    if not isinstance(index, dict):
        raise PipelineExportError(f"{path}: expected a JSON object, got {type(index).__name__}")
    parts = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}
    refused = sorted(parts & set(REFUSED))
    if refused:  # named before the class: an SDXL or ControlNet folder is told which part ddengine lacks
        raise PipelineExportError(
            f"{folder}: ddengine does not run {', '.join(f'{p} ({REFUSED[p]})' for p in refused)}; "
            f"it exports {', '.join(PIPELINES)} folders with the parts {', '.join(RUN)}"
        )
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise PipelineExportError(f"{path}: pipeline class {name!r} is not supported (expected {', '.join(PIPELINES)})")
    unknown = sorted(parts - set(RUN) - set(IGNORED) - set(REFUSED))
    missing = sorted(set(RUN) - parts)
    if unknown or missing:
        raise PipelineExportError(
            f"{folder}: expected the parts {', '.join(RUN)}; missing {missing}, not supported {unknown}"
        )
    return index


def read_config(folder, part):
    """PART/config.json of a pipeline folder, read before any weights are."""
    path = Path(folder) / part / "config.json"
    try:
        config = read_bounded_json(path, "config.json")
    except (OSError, ValueError) as err:
        raise PipelineExportError(f"{path}: {err}") from None
    if not isinstance(config, dict):
        raise PipelineExportError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def check_unet(config):
    """Refuse U-Net features beyond text conditioning, naming them."""
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise PipelineExportError(f"the U-Net is a {config['_class_name']!r}; expected a UNet2DConditionModel")
    extra = {
        k: config.get(k)
        for k in ("addition_embed_type", "class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")
    }
    used = {k: v for k, v in extra.items() if v is not None}
    if used:
        raise PipelineExportError(
            f"the U-Net uses {', '.join(f'{k}={v!r}' for k, v in used.items())} (SDXL micro-conditioning, "
            "class or image embeddings): only text-conditioned U-Nets are supported"
        )
    if config.get("in_channels") != config.get("out_channels"):
        raise PipelineExportError(
            f"U-Net in_channels {config.get('in_channels')} != out_channels {config.get('out_channels')} "
            "(inpainting or learned variance) is not supported"
        )


def export_pipeline(folder, out_dir, fp16=False, height=None, width=None, log=print):
    """Export every part into a temporary folder, verify each against torch, then rename it to `out_dir`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from .diffusers_export import scheduler_from

    folder, out_dir = Path(folder), Path(out_dir)
    index = read_index(folder)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PipelineExportError(f"output folder {out_dir} exists and is not empty; choose a new -o")
    scheduler = scheduler_from(folder / "scheduler" / "scheduler_config.json")
    unet_config = read_config(folder, "unet")
    check_unet(unet_config)
    latent, scale = latent_size(unet_config, read_config(folder, "vae"), height, width)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).eval()
    vae = AutoencoderKL.from_pretrained(str(folder / "vae")).eval()
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    text_length = min(int(tokenizer.model_max_length), int(text.config.max_position_embeddings), TEXT_LENGTH * 16)
    hidden = text.config.hidden_size
    for stale in remove_stale_staging(out_dir):
        log(f"removed {stale}, left by an export that was killed")
    tmp = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    try:
        errors = {}
        with torch.inference_mode():
            errors["text_encoder"] = _text_encoder(text, tmp, text_length, fp16, log)
            errors["unet"] = _unet(unet, tmp, scheduler, latent, text_length, hidden, fp16, log)
            errors["vae_decoder"] = _vae_decoder(vae, tmp, latent, fp16, log)
            errors["vae_encoder"] = _vae_encoder(vae, tmp, latent, scale, fp16, log)
        tokenizer.backend_tokenizer.save(str(tmp / DEFAULT_FILES["tokenizer"]))
        spec = PipelineSpec(
            text_length=text_length,
            pad_token_id=int(tokenizer.pad_token_id),
            image_channels=vae.config.out_channels,
            vae_scaling_factor=float(vae.config.scaling_factor),
            vae_scale=scale,
            files={**DEFAULT_FILES, **OPTIONAL_FILES},
            source={
                "pipeline": index.get("_class_name"),
                "diffusers": index.get("_diffusers_version"),
                "fp16": bool(fp16),
            },
        )
        (tmp / "pipeline.json").write_text(spec.to_json())
        PipelineSpec.read(tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.chmod(tmp, DIR_MODE)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return errors


def staging_prefix(out_dir):
    """The hidden folder name an export of `out_dir` stages in, next to it, before the pid that owns it."""
    return f".{Path(out_dir).name}.staging-"


def remove_stale_staging(out_dir):
    """Remove the staging folders of `out_dir` whose export process is gone (killed with -9); returns them."""
    out_dir, removed = Path(out_dir), []
    for path in out_dir.absolute().parent.glob(staging_prefix(out_dir) + "*"):
        pid = path.name[len(staging_prefix(out_dir)) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def latent_size(unet_config, vae_config, height=None, width=None):
    """((h, w) latents, VAE scale) for images of height x width (default: the U-Net's sample_size times the scale);
    each side a multiple of the VAE's scale times the U-Net's downsampling."""
    scale = 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)
    size = unet_config.get("sample_size", 64)
    latent = (size, size) if isinstance(size, int) else tuple(size)
    if height is None and width is None:
        return latent, scale
    step = scale * 2 ** (len(unet_config.get("block_out_channels", (1,))) - 1)
    h = latent[0] * scale if height is None else height
    w = latent[1] * scale if width is None else width
    if h < step or w < step or h % step or w % step:
        raise PipelineExportError(
            f"--height/--width must be positive multiples of {step} (the VAE's factor {scale} times the "
            f"U-Net's downsampling {step // scale}), got {h}x{w}"
        )
    return (h // scale, w // scale), scale


def _text_encoder(text, folder, length, fp16, log):
    """CLIPTextModel: input_ids (N, length) int64 -> last_hidden_state (N, length, hidden)."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = text

        def forward(self, input_ids):
            return self.text(input_ids).last_hidden_state

    vocab = text.config.vocab_size
    feeds = lambda n, seed: {"input_ids": np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int64)}  # noqa: E731
    return _part(
        TextEncoder().eval(),
        feeds,
        ["hidden_states"],
        folder / DEFAULT_FILES["text_encoder"],
        fp16,
        log,
        "text encoder",
    )


def text_unet(unet):
    """UNet2DConditionModel -> a Module with ddengine's U-Net signature: (sample, timestep, encoder_hidden_states) -> out."""
    import torch

    class TextUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample

    return TextUNet().eval()


def _unet(unet, folder, scheduler, latent, length, hidden, fp16, log):
    """UNet2DConditionModel as a ddengine U-Net: sample, timestep, encoder_hidden_states -> out, with its metadata."""
    from ddengine.model.spec import METADATA_KEY

    channels = unet.config.in_channels
    spec = replace(spec_for(scheduler, channels, latent[0], latent[1], 0, text=True), recommended_guidance=GUIDANCE)
    T = scheduler["num_train_timesteps"]

    def feeds(n, seed):
        rng = np.random.default_rng(seed)
        return {
            "sample": rng.standard_normal((n, channels, *latent)).astype(np.float32),
            "timestep": rng.integers(0, T, n).astype(np.int64),
            "encoder_hidden_states": rng.standard_normal((n, length, hidden)).astype(np.float32),
        }

    return _part(
        text_unet(unet),
        feeds,
        ["out"],
        folder / DEFAULT_FILES["unet"],
        fp16,
        log,
        "U-Net",
        metadata={METADATA_KEY: spec.to_json()},
    )


def _vae_decoder(vae, folder, latent, fp16, log):
    """AutoencoderKL decoder: latents (N, C, h, w) / scaling_factor -> image (N, 3, H, W) in [-1, 1]."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latent):
            return self.vae.decode(latent / self.vae.config.scaling_factor).sample

    c = vae.config.latent_channels
    feeds = lambda n, seed: {"latent": np.random.default_rng(seed).standard_normal((n, c, *latent)).astype(np.float32)}  # noqa: E731
    return _part(Decoder().eval(), feeds, ["image"], folder / DEFAULT_FILES["vae_decoder"], fp16, log, "VAE decoder")


def _vae_encoder(vae, folder, latent, scale, fp16, log):
    """AutoencoderKL encoder: image (N, 3, H, W) in [-1, 1] -> vae.encode(image).latent_dist.mean (N, C, h, w), the
    posterior's mean, unscaled: deterministic, as diffusers' retrieve_latents(sample_mode="argmax")."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, image):
            return self.vae.encode(image).latent_dist.mean

    shape = (vae.config.in_channels, latent[0] * scale, latent[1] * scale)
    feeds = lambda n, seed: {"image": np.random.default_rng(seed).uniform(-1, 1, (n, *shape)).astype(np.float32)}  # noqa: E731
    path = folder / OPTIONAL_FILES["vae_encoder"]
    return _part(Encoder().eval(), feeds, ["latent"], path, fp16, log, "VAE encoder")


def _part(module, feeds, outputs, path, fp16, log, what, metadata=None):
    """Export one part to `path` (dynamic batch), verify it against torch; the fp16 variant when asked."""
    log(f"exporting the {what} ...")
    export_graph(module, feeds(2, 0), outputs, path, metadata=metadata, fp16=fp16)
    atol = ATOL if not fp16 else None
    try:
        return verify_file(path, module, feeds, atol)
    except ExportError as err:
        raise ExportError(f"{what}: {err}") from None
