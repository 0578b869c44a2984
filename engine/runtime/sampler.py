"""The Python API: `Sampler(model).sample(n, steps=50, ...)` -> uint8 images and one record per image.

`Sampler.stream` yields finished chunks as they are done (bounded memory for any n); `sample` collects them.
The fields of a request are SamplingParams' (engine/runtime/params.py); each image's record carries everything
its manifest line needs: seed, class, status, the request's parameters, the model's hash, the backend and its
precision. A Sampler runs its model's Parts (engine/runtime/parts.py) one chunk at a time, on the device loop
when the backend opens device runners and no step needs the host, else on the host loop.
"""

import numpy as np

from ddengine.runtime.capacity import check_memory, parse_threads
from ddengine.runtime.loop import HostLoop
from ddengine.runtime.params import InvalidParameterError, SamplingParams, integer
from ddengine.runtime.parts import Chunk, open_parts, preview_steps, to_uint8

__all__ = ["Sampler", "SamplingParams", "Chunk", "InvalidParameterError", "to_uint8"]


class Sampler:
    """Samples a ddengine ONNX model or text-to-image folder; one backend session shared by every call (thread-safe)."""

    def __init__(self, model=None, backend="auto", scheduler_config=None, *, threads=None, precision="auto"):
        self.parts = open_parts(model, backend, scheduler_config, threads=parse_threads(threads), precision=precision)
        self.model, self.spec, self.backend = self.parts.model, self.parts.spec, self.parts.backend
        self.host_loop = HostLoop(self.backend, self.spec, self.parts.threads)
        self.device_loop = None  # GPU backends run the whole loop on the device (engine/runtime/device_loop.py)
        if self.backend.opens_device_runners:
            from ddengine.runtime.device_loop import DeviceLoops

            self.device_loop = DeviceLoops(self.backend)

    @property
    def image_shape(self):
        """(H, W, C) of the uint8 images this sampler returns (decoded from latents for a text-to-image model)."""
        return self.parts.image_shape

    def close(self):
        if self.device_loop is not None:
            self.device_loop.close()
        self.parts.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sample(
        self,
        params=None,
        /,
        *,
        batch_size=16,
        trajectory=False,
        progress=None,
        callback=None,
        previews=0,
        on_preview=None,
        **fields,
    ):
        """Generate images: uint8 (n, H, W, C) and one record per image (index, seed, class, status, error, ...).

        `params`: a SamplingParams, or n with the other SamplingParams fields as keywords (steps, method, eta, seed,
        seeds, classes, guidance, spacing, prompt, negative_prompt). Image i uses seeds[i] (default seed + i) and is
        bit-identical whatever `batch_size`. `progress(done, total)` is called after every step; `callback(step,
        timestep, x, first_index)` sees each chunk's latents after each step; `trajectory=k` adds x_t and
        predicted-x0 snapshots every k steps; `on_preview(k, images, first_index)` gets `previews` uint8 previews
        per chunk, decoded from the fused kernel's x0 and spread over the steps (the server's streamed previews).
        """
        request = self.request(params, batch_size=batch_size, trajectory=trajectory, **fields)
        return self.run(request, progress=progress, callback=callback, previews=(previews, on_preview))

    def stream(
        self,
        params=None,
        /,
        *,
        batch_size=16,
        trajectory=False,
        progress=None,
        callback=None,
        previews=0,
        on_preview=None,
        **fields,
    ):
        """Like `sample`, but yields each finished Chunk (start, images, records) instead of keeping them all."""
        request = self.request(params, batch_size=batch_size, trajectory=trajectory, **fields)
        return self.chunks(request, progress=progress, callback=callback, previews=(previews, on_preview))

    def request(self, params=None, /, *, batch_size=16, trajectory=False, **fields):
        """A SamplingParams (or n and its fields) checked against this model and machine (InvalidParameterError)."""
        params = SamplingParams.given(params, **fields)
        if trajectory and not self.parts.decoder.pixel_space:
            raise InvalidParameterError(
                "trajectory snapshots are of pixel-space models; this is a latent text-to-image model"
            )
        request = params.bind(self.spec, batch_size, trajectory)
        check_memory(self.model, request, self.backend.max_rows)
        self.parts.plan(request)
        return self.parts.encode_start(request)  # a latent model's image through its VAE encoder, once

    def plan(self, request):
        """The StepPlan of a validated request (made once per steps, method, eta and spacing)."""
        return self.parts.plan(request)

    def run(self, request, *, progress=None, callback=None, timers=None, previews=(0, None)):
        """Sample a validated request; all images at once (see `chunks` for a stream)."""
        check_memory(self.model, request, keep_images=True, image_elements=int(np.prod(self.image_shape)))
        chunks = list(self.chunks(request, progress=progress, callback=callback, timers=timers, previews=previews))
        images = np.concatenate([c.images for c in chunks])
        return images, [r for c in chunks for r in c.records]

    def chunks(self, request, *, progress=None, callback=None, timers=None, previews=(0, None)):
        """Yield each Chunk of `request.batch_size` images as soon as it is sampled."""
        plan, b = self.parts.plan(request), request.batch_size
        count, on_preview = integer("previews", previews[0], 0), previews[1]
        if count and on_preview is None:
            raise InvalidParameterError("previews needs on_preview(k, images, first_index) to receive them")
        if count and request.trajectory:
            raise InvalidParameterError("previews and trajectory snapshots cannot be asked together; pick one")
        total = request.n * len(plan)  # model evaluations: PLMS makes steps + 1, image-to-image fewer
        for start in range(0, request.n, b):
            part = slice(start, min(start + b, request.n))
            seeds = np.ascontiguousarray(request.seeds[part])
            conditioning = self.parts.conditioner.condition(request, part)  # per chunk: bounded memory for any n

            def on_step(i, *_, start=start, k=part.stop - part.start):
                if progress is not None:
                    progress(start * len(plan) + (i + 1) * k, total)

            trajectory: list | None = [] if request.trajectory else None
            step_hook = on_step if callback is None else _with_callback(on_step, callback, start)
            snapshots: Snapshots | Previews | None = None
            if trajectory is not None:
                snapshots = Snapshots(trajectory, len(plan), request.trajectory)
            if count:
                snapshots = Previews(self.parts, request, preview_steps(len(plan), count), on_preview, start)
            options = dict(on_step=step_hook, snapshots=snapshots, timers=timers)
            if self.device_loop is not None and request.init is None:  # callbacks and snapshots read device x, x0
                x, bad = self.device_loop.denoise(plan, seeds, conditioning, host_x=callback is not None, **options)
            else:  # a CPU backend, or a start of the caller's (image-to-image, latents=, inpainting)
                begin = None if request.init is None else request.init.part(part)
                x, bad = self.host_loop.denoise(plan, seeds, conditioning, start=begin, **options)
            yield self.parts.finish(request, part, x, bad, trajectory)


def _with_callback(on_step, callback, first_index):
    def hook(i, t, x):
        on_step(i)
        callback(i, t, x, first_index)

    return hook


class Previews:
    """A chunk's previews, in the loop's snapshot interface: after each preview step, the kernel's x0 decoded."""

    def __init__(self, parts, request, at, on_preview, first_index):
        self.parts, self.request, self.at, self.on_preview, self.first = parts, request, at, on_preview, first_index

    def wants(self, i):
        return i + 1 in self.at

    def take(self, i, t, x_t, x0):
        self.on_preview(self.at[i + 1], self.parts.preview(self.request, x0), self.first)


class Snapshots:
    """(step, t, x_t, predicted x0) every `every` steps and at the last, into a list."""

    def __init__(self, into, steps, every):
        self.into, self.steps, self.every = into, steps, every

    def wants(self, i):
        return i % self.every == 0 or i == self.steps - 1

    def take(self, i, t, x_t, x0):
        self.into.append((i, t, x_t, x0))
