"""A latent text-to-image model (Stable Diffusion's layout) around the engine's loop, torch-free: the tokenizer
(tokenizers), the text encoder once per distinct prompt, the U-Net loop over latents with the same fused step and
CFG combine (the prompt embedding is one more per-row input), and the VAE decoder in batches after the loop.
"""
import collections
import threading

import numpy as np

from ddengine.batch import doubles
from ddengine.parts import OnnxPart
from ddengine.pipeline_spec import PipelineSpec
from ddengine.tokenizer import PromptTokenizer

EMBEDDINGS = "encoder_hidden_states"
CACHED_PROMPTS = 256


class TextPipeline:
    """The parts of a model folder (engine/pipeline_spec.py) other than the U-Net, which the Sampler runs."""

    def __init__(self, folder, backend="auto", precision="auto", threads=None):
        self.folder, self.spec = folder, PipelineSpec.read(folder)
        self.unet_path = self.spec.path(folder, "unet")
        self.tokenizer = PromptTokenizer(self.spec.path(folder, "tokenizer"), self.spec.text_length, self.spec.pad_token_id)
        # The text encoder runs once per distinct prompt: exact fp32. The VAE decoder is conv-heavy: the backend asked for.
        self.text_encoder = OnnxPart(self.spec.path(folder, "text_encoder"), "ort-cpu", "auto", threads)
        self.vae_decoder = OnnxPart(self.spec.path(folder, "vae_decoder"), backend, precision, threads)
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

    def conditions(self, prompts, negative_prompts, guidance):
        """({encoder_hidden_states: (own rows, unconditional rows)}, guided): g = 0 runs the negative prompt alone."""
        positive, negative = self.embed(prompts), self.embed(negative_prompts)
        own = negative if guidance == 0 else positive
        return {EMBEDDINGS: (own, negative)}, doubles(guidance)

    def decode(self, latents, batch_size):
        """Images (N, 3, H, W) in [-1, 1] from x_0 latents, the VAE decoder run `batch_size` at a time."""
        parts = [self.vae_decoder(latent=np.ascontiguousarray(latents[i:i + batch_size]))
                 for i in range(0, len(latents), batch_size)]
        return np.concatenate(parts).astype(np.float32)
