"""The parts of a latent text-to-image model (Stable Diffusion's layout) around the engine's loop, torch-free:
PromptConditioner (the tokenizer and the text encoder, once per distinct prompt; the embedding is one more
per-row U-Net input) and VaeDecoder (the VAE decoder in batches after the loop). Chosen at load time by
engine/runtime/parts.py for a model folder (engine/model/pipeline_spec.py).
"""

import collections
import threading

import numpy as np

from ddengine.core.guidance import Conditioning
from ddengine.model.load import load_model
from ddengine.model.pipeline_spec import PipelineSpec
from ddengine.text.parts import OnnxPart
from ddengine.text.tokenizer import PromptTokenizer

EMBEDDINGS = "encoder_hidden_states"
CACHED_PROMPTS = 256


def open_text_model(folder, scheduler_config=None, backend="auto", precision="auto", threads=None):
    """(the U-Net's Model, its PromptConditioner, its VaeDecoder) of a model folder."""
    spec = PipelineSpec.read(folder)
    unet = load_model(spec.path(folder, "unet"), scheduler_config)
    tokenizer = PromptTokenizer(spec.path(folder, "tokenizer"), spec.text_length, spec.pad_token_id)
    # The text encoder runs once per distinct prompt: exact fp32. The VAE decoder is conv-heavy: the backend asked for.
    encoder = OnnxPart(spec.path(folder, "text_encoder"), "ort-cpu", "auto", threads)
    decoder = VaeDecoder(OnnxPart(spec.path(folder, "vae_decoder"), backend, precision, threads), spec, unet.spec)
    return unet, PromptConditioner(tokenizer, encoder), decoder


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
