"""Layer `text`: the parts around a latent U-Net — tokenizer, text encoder (PromptConditioner) and VAE decoder
(VaeDecoder) of a text-to-image model folder.

May import `backends`, `model`, `core` and `files`."""
