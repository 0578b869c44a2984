"""The denoising loop on the host, behind the interface the device loop (engine/runtime/device_loop.py) shares:

    denoise(plan, seeds, conditioning, on_step=None) -> (x_0 float32 (B, C, H, W), nonfinite_step int64 (B,))

nonfinite_step[j] is the first step at which image j's model output or update went non-finite (-1: none), as the fused
kernel records it on either side. Each step is improved-diffusion's p_sample_loop step: one forward, one update.
"""

import time

import numpy as np

from ddengine.runtime.batch import ImageBatch


class HostLoop:
    """Any backend's forward on host arrays plus the C step kernel (ddengine.kernels._step)."""

    def __init__(self, backend, spec, threads=0):
        self.backend, self.spec, self.threads = backend, spec, threads

    def denoise(self, plan, seeds, conditioning, on_step=None, snapshots=None, timers=None, start=None):
        """Sample one chunk (its Conditioning, engine/core/guidance.py; start: ImageBatch.admit's): on_step(i, t, x)
        after each step; snapshots.take(i, t, x_t, x0) after the steps snapshots.wants(i), with the kernel's x0."""
        n = len(seeds)
        batch = ImageBatch(self.backend, self.spec, n, threads=self.threads)
        batch.admit(plan, seeds, conditioning, list(range(n)), start)
        if snapshots is not None:
            batch.keep_x0()
        clock = time.perf_counter
        for i, t in enumerate(plan.timesteps.tolist()):
            start = clock()
            batch.forward()
            middle = clock()
            x_t = batch.x.copy() if snapshots is not None and snapshots.wants(i) else None
            batch.update()
            if x_t is not None:
                snapshots.take(i, t, x_t, batch.x0[:n].copy())
            if timers is not None:
                timers["forward"] = timers.get("forward", 0.0) + middle - start
                timers["step"] = timers.get("step", 0.0) + clock() - middle
            if on_step is not None:
                on_step(i, t, batch.x)
        x, bad, _ = batch.retire(np.arange(n))
        return x, bad
