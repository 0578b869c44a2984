"""A tiny random diffusers StableDiffusionPipeline folder (CLIP text encoder, conditional U-Net, VAE, CLIP BPE
tokenizer, DDIM scheduler with Stable Diffusion's schedule) that exports and samples in seconds.

Latents are 4x16x16 and the VAE has two levels (scale 2), so images are 3x32x32. The vocabulary holds the
letters and a few words; `refusing_folder` writes the folders the exporter must refuse. The fixtures `tiny_sd`
and `tiny_sd16` (import them into a test module) build the folder and export it with `ddengine export --diffusers`
once per test session, whichever modules ask for them.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

LATENT, SCALE, TEXT_LENGTH, HIDDEN = 16, 2, 77, 32
IMAGE = LATENT * SCALE
WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "shoe", "bag", "the", "green", "blurry")
PROMPTS = ("a photo of a cat", "a red shoe", "the blue bag")
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    num_train_timesteps=1000,
)


def tiny_unet(**overrides):
    """UNet2DConditionModel, two levels (32, 64 channels), cross-attention on 32-dim text states."""
    from diffusers import UNet2DConditionModel

    config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=LATENT,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=HIDDEN,
        norm_num_groups=8,
        attention_head_dim=8,
    )
    return UNet2DConditionModel(**(config | overrides))


def tiny_vae():
    """AutoencoderKL with two levels: 4 latent channels, an image SCALE times the latent's size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=IMAGE,
    )


def tiny_text_encoder():
    """CLIPTextModel: 2 layers, hidden size 32, 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=HIDDEN,
            intermediate_size=37,
            layer_norm_eps=1e-5,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=TEXT_LENGTH,
        )
    )


def tiny_tokenizer(folder):
    """A CLIPTokenizer over letters and WORDS (no merges: words are whole tokens when listed, else letters)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    for word in WORDS:
        vocab.setdefault(word + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=TEXT_LENGTH)


def build_tiny_pipeline(folder, seed=0):
    """Save a random tiny StableDiffusionPipeline to `folder`; returns the folder."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = Path(folder)
    torch.manual_seed(seed)
    unet, vae, text = tiny_unet(), tiny_vae(), tiny_text_encoder()
    tokenizer = tiny_tokenizer(folder.parent / f".{folder.name}_vocab")
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    return folder


def load_pipeline(folder):
    """diffusers' own StableDiffusionPipeline of a saved folder (the oracle)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)


REFUSED_PARTS = {
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "controlnet": ["diffusers", "ControlNetModel"],
    "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
}


def refusing_folder(source, dest, parts=(), unet_config=None, class_name=None):
    """A copy of the pipeline folder `source` (model_index.json and configs only) with more `parts` listed in
    model_index.json (and its `_class_name` replaced), or with `unet_config` entries merged into unet/config.json."""
    source, dest = Path(source), Path(dest)
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    index = json.loads((dest / "model_index.json").read_text())
    index.update({part: REFUSED_PARTS[part] for part in parts})
    index["_class_name"] = class_name or index["_class_name"]
    (dest / "model_index.json").write_text(json.dumps(index))
    if unet_config:
        config = json.loads((dest / "unet" / "config.json").read_text())
        (dest / "unet" / "config.json").write_text(json.dumps(config | unet_config))
    return dest


_EXPORTS = {}  # (session folder, fp16) -> SimpleNamespace: one build and one export per session


def exported(base, fp16=False):
    """SimpleNamespace(pipeline, model, output): the tiny pipeline under `base` and its CLI export (fp16 on request)."""
    from click.testing import CliRunner

    from ddengine.cli import main

    key = (str(base), fp16)
    if key not in _EXPORTS:
        base = Path(base)
        pipeline = base / "pipeline"
        if not (pipeline / "model_index.json").exists():
            build_tiny_pipeline(pipeline)
        model = base / ("model_fp16" if fp16 else "model")
        result = CliRunner().invoke(
            main, ["export", "--diffusers", str(pipeline), "-o", str(model), *(["--fp16"] if fp16 else [])]
        )
        assert result.exit_code == 0, result.output
        _EXPORTS[key] = SimpleNamespace(pipeline=pipeline, model=model, output=result.output)
    return _EXPORTS[key]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """The tiny pipeline folder and its fp32 export (built once per session)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return exported(tmp_path_factory.getbasetemp() / "tiny_sd")


@pytest.fixture(scope="session")
def tiny_sd16(tmp_path_factory, tiny_sd):
    """The same pipeline's fp16 export (built once per session)."""
    pytest.importorskip("onnxconverter_common")
    return exported(tmp_path_factory.getbasetemp() / "tiny_sd", fp16=True)
