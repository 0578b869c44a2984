"""A diffusers UNet2DModel behind the engine's input contract: forward(sample, timestep, class_labels) -> output."""

import torch


class DiffusersUNet(torch.nn.Module):
    """Wraps a UNet2DModel; class labels are passed only to a class-conditional one (num_class_embeds set)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.conditional = bool(getattr(unet.config, "num_class_embeds", None))

    def forward(self, sample, timestep, class_labels=None):
        return self.unet(sample, timestep, class_labels=class_labels if self.conditional else None).sample
