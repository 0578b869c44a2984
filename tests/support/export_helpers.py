"""Helpers shared by the export tests (a module name of its own: tests/engine has a conftest too)."""
import torch


def tiny_config(**overrides):
    """A 16x16, two-level U-Net with 3 classes (null class 3): exports in seconds."""
    from ddengine.nets.unet import UNetConfig

    cfg = dict(image_size=16, base_channels=8, channel_mult=(1, 2), groups=4, head_channels=16, num_classes=3)
    return UNetConfig(**(cfg | overrides))


def randomized(module, seed=0, scale=0.2):
    """Perturb every parameter so zero-initialised output layers do not hide errors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return module.eval()
