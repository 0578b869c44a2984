"""Prompts to token ids through the `tokenizers` library (no transformers): CLIP BPE from the exported
tokenizer.json, padded and truncated to the text encoder's length as diffusers' pipelines ask for it."""

import numpy as np

from ddengine.model.load import ModelError


class TokenizerError(ModelError):
    """The tokenizer file is missing or unreadable, or the `tokenizers` package is not installed."""


class PromptTokenizer:
    """`tokenize(prompts) -> int64 (N, length)`: padding="max_length", truncation=True (diffusers' call)."""

    def __init__(self, path, length, pad_id):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("text-to-image models need the tokenizers package: pip install tokenizers") from None
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises its own Exception types
            raise TokenizerError(f"cannot read tokenizer {path}: {err}") from None
        self.tokenizer.enable_truncation(max_length=length)
        self.tokenizer.enable_padding(length=length, pad_id=pad_id, pad_token=self.tokenizer.id_to_token(pad_id) or "")
        self.length = length

    @property
    def vocabulary(self):
        """How many tokens the tokenizer knows (added tokens included)."""
        return self.tokenizer.get_vocab_size()

    def __call__(self, prompts):
        return np.array([e.ids for e in self.tokenizer.encode_batch(list(prompts))], dtype=np.int64)
