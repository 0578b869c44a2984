"""The inpainting state of an ImageBatch's slots: each image's known image, mask and initial noise z, and the blend
of diffusers' StableDiffusionInpaintPipeline (4-channel U-Nets) after every step:
x = (1 - m) (sqrt(abar') known + sqrt(1 - abar') z) + m x, abar' the next step's noise level (1 after the last)."""

import numpy as np

from ddengine.kernels import host as fused


class Inpainting:
    """Per-slot buffers (allocated on the first masked image a batch admits); plans[j] is None where not inpainting."""

    def __init__(self, capacity, image_shape):
        self.known = np.zeros((capacity, *image_shape), np.float32)
        self.z0 = np.zeros((capacity, *image_shape), np.float32)
        self.masks = np.ones((capacity, 1, *image_shape[1:]), np.float32)
        self.plans: list = [None] * capacity

    def admit(self, plan, new, seeds, start, threads):
        """Keep the Start (engine/runtime/init_state.py) of the images in slots `new`; no mask: no blend."""
        k = new.stop - new.start
        if start.masks is None:
            self.plans[new] = [None] * k
            return
        self.known[new], self.masks[new] = start.known, start.masks
        if start.noise is None:
            fused.fill_noise(self.z0[new], seeds, threads, 1.0)
        else:
            self.z0[new] = start.noise
        self.plans[new] = [plan] * k

    def blend(self, x, remaining):
        """The blend of every inpainted image in x (n, ...) after a step; remaining: each image's steps to go."""
        for j in np.flatnonzero([p is not None for p in self.plans[: len(x)]]):
            plan = self.plans[j]
            level = plan.levels[len(plan) - int(remaining[j])]
            a, b = np.float32(np.sqrt(level)), np.float32(np.sqrt(1.0 - level))
            m = self.masks[j]
            x[j] = (1 - m) * (a * self.known[j] + b * self.z0[j]) + m * x[j]

    def keep(self, keep):
        """Compact the slots to `keep` (ImageBatch.retire's order)."""
        m = len(keep)
        for store in (self.known, self.z0, self.masks):
            store[:m] = store[keep]
        self.plans[:m] = [self.plans[s] for s in keep]
