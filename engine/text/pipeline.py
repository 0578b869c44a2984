"""The parts of a latent text-to-image model (Stable Diffusion's layout) around the engine's loop, torch-free:
read_text_model (the folder, its pipeline.json bound to its graphs by engine/text/binding.py), PromptConditioner
(the tokenizer and the text encoder, once per distinct prompt; the embedding is one more per-row U-Net input),
VaeDecoder (the VAE decoder in batches after the loop) and VaeEncoder (image-to-image and inpainting: a request's
images to latents, once, before the loop; absent from folders exported before it). Chosen at load time by
engine/runtime/parts.py for a model folder (engine/model/pipeline_spec.py).
"""

import collections
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddengine.core.guidance import Conditioning
from ddengine.model.load import Model, load_model
from ddengine.model.pipeline_spec import PipelineSpec
from ddengine.text.binding import EMBEDDINGS, bind_graphs, bind_tokenizer, read_signatures
from ddengine.text.parts import OnnxPart
from ddengine.text.tokenizer import PromptTokenizer

CACHED_PROMPTS = 256


@dataclass(frozen=True)
class TextModel:
    """A model folder whose pipeline.json is bound to its graphs and tokenizer; nothing of it has run yet."""

    folder: Path
    spec: PipelineSpec
    unet: Model
    signatures: dict  # part -> its graph's declared I/O (engine/text/binding.py Signature)
    tokenizer: PromptTokenizer

    def path(self, part):
        return self.spec.path(self.folder, part)


def read_text_model(folder, scheduler_config=None):
    """The TextModel of a folder: what `sample` and `info` check before any inference (engine/text/binding.py)."""
    spec = PipelineSpec.read(folder)
    signatures = read_signatures(folder, spec)  # before the U-Net loads: a swapped folder is refused by name
    unet = load_model(spec.path(folder, "unet"), scheduler_config)
    bind_graphs(spec, signatures, unet.spec)
    tokenizer = PromptTokenizer(spec.path(folder, "tokenizer"), spec.text_length, spec.pad_token_id)
    bind_tokenizer(spec, tokenizer.vocabulary)
    return TextModel(Path(folder), spec, unet, signatures, tokenizer)


def open_text_model(folder, scheduler_config=None, backend="auto", precision="auto", threads=None):
    """(the U-Net's Model, its PromptConditioner, its VaeDecoder, its VaeEncoder or None) of a model folder."""
    model = read_text_model(folder, scheduler_config)
    # The text encoder runs once per distinct prompt: exact fp32. The VAE decoder is conv-heavy: the backend asked
    # for; so is the VAE encoder, its mirror (a conv stack at the image's full size, once per request's image).
    text = OnnxPart(model.path("text_encoder"), "ort-cpu", "auto", threads)
    decoder = VaeDecoder(OnnxPart(model.path("vae_decoder"), backend, precision, threads), model.spec, model.unet.spec)
    encoder = None
    if model.spec.has("vae_encoder"):
        part = OnnxPart(model.path("vae_encoder"), backend, precision, threads)
        encoder = VaeEncoder(part, model.spec, model.unet.spec)
    return model.unet, PromptConditioner(model.tokenizer, text), decoder, encoder


class PromptConditioner:
    """Each image's prompt embedding on its own row, its negative prompt's on the unconditional row."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self._cache = collections.OrderedDict()  # prompt -> embedding (text_length, D)
        self._lock = threading.Lock()

    def embed(self, prompts):
        """(len(prompts), text_length, D) float32: each distinct prompt through the text encoder once (LRU cache)."""
        with self._lock:
            new = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if new:
            hidden = self.text_encoder(input_ids=self.tokenizer(new)).astype(np.float32)
            with self._lock:
                for prompt, h in zip(new, hidden):
                    self._cache[prompt] = h
                while len(self._cache) > CACHED_PROMPTS:
                    self._cache.popitem(last=False)
        with self._lock:
            return np.stack([self._cache[p] for p in prompts])

    def forget_prompts(self):
        """Empty the embedding cache (each prompt is encoded again)."""
        with self._lock:
            self._cache.clear()

    def condition(self, request, images=slice(None)):
        """Conditioning of images `images` (a slice) of a bound Request: g = 0 runs the negative prompt alone."""
        positive = self.embed(request.prompts[images])
        negative = self.embed(request.negative_prompts[images])
        return Conditioning.of(EMBEDDINGS, positive, negative, request.guidance)


class VaeDecoder:
    """x_0 latents -> images in [-1, 1] through the VAE decoder, `batch_size` latents at a time."""

    pixel_space = False  # x_t are latents: no trajectory snapshots
    value_range = (-1.0, 1.0)

    def __init__(self, part, spec, unet_spec):
        self.part, self.latent_scale = part, spec.vae_scale
        channels, height, width = spec.image_shape(unet_spec)
        self.image_shape = (height, width, channels)

    def decode(self, latents, batch_size):
        parts = [
            self.part(latent=np.ascontiguousarray(latents[i : i + batch_size]))
            for i in range(0, len(latents), batch_size)
        ]
        return np.concatenate(parts).astype(np.float32)


class VaeEncoder:
    """Images in [-1, 1] (k, C, H, W) -> latents (k, c, h, w): the VAE posterior's mean times vae_scaling_factor, as
    diffusers' img2img and inpaint pipelines' _encode_vae_image with retrieve_latents(sample_mode="argmax")."""

    value_range = (-1.0, 1.0)

    def __init__(self, part, spec, unet_spec):
        self.part, self.latent_scale = part, spec.vae_scale
        self.scaling_factor = np.float32(spec.vae_scaling_factor)
        channels, height, width = spec.image_shape(unet_spec)
        self.image_shape = (height, width, channels)

    def encode(self, images, batch_size):
        parts = [
            self.part(image=np.ascontiguousarray(images[i : i + batch_size])) for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts).astype(np.float32) * self.scaling_factor
