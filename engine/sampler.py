"""The Python API: `Sampler(model).sample(n, steps=50, ...)` -> uint8 images and one record per image.

`Sampler.stream` yields finished chunks as they are done (bounded memory for any n); `sample` collects them.
Each image's record carries everything its manifest line needs: seed, class, status, the request's
parameters, the model's hash, the backend and its precision.
"""
import math
from dataclasses import dataclass

import numpy as np

import ddengine
from ddengine.backends import create_backend
from ddengine.loop import HostLoop
from ddengine.model import Model, load_model
from ddengine.pipeline_spec import is_pipeline_folder
from ddengine.reference import guided_output, predicted_x0
from ddengine.requests import InvalidParameterError, check_memory, make_request, parse_threads

__all__ = ["Sampler", "Chunk", "InvalidParameterError", "to_uint8"]
PLAN_CACHE = 64


@dataclass(frozen=True)
class Chunk:
    """Images start .. start + len(images) - 1 of a request: uint8 (k, H, W, C) and their records."""

    start: int
    images: np.ndarray
    records: list


class Sampler:
    """Samples a ddengine ONNX model; one backend session shared by every call (thread-safe)."""

    def __init__(self, model=None, backend="auto", scheduler_config=None, *, threads=None, precision="auto"):
        threads = parse_threads(threads)
        self.pipeline = None  # a text-to-image model folder: tokenizer, text encoder and VAE around the U-Net
        if not isinstance(model, Model) and model is not None and is_pipeline_folder(model):
            from ddengine.pipeline import TextPipeline

            self.pipeline = TextPipeline(model, backend, precision, threads)
            model = self.pipeline.unet_path
        self.model = model if isinstance(model, Model) else load_model(model, scheduler_config)
        self.spec = self.model.spec
        # a manifest must say which schedule an override put in place of the model's own
        self.scheduler_override = None if scheduler_config is None else dict(self.spec.scheduler)
        self.backend = create_backend(backend, self.model, threads=threads, precision=precision)
        self.threads = threads or 0
        self._plans = {}  # Request.plan_key -> StepPlan (read-only)
        self.host_loop = HostLoop(self.backend, self.spec, self.threads)
        self.device_loop = None  # GPU backends run the whole loop on the device (engine/gpu/loop.py)
        if callable(getattr(self.backend, "open_runner", None)):
            from ddengine.gpu.loop import DeviceLoops

            self.device_loop = DeviceLoops(self.backend)

    @property
    def image_shape(self):
        """(H, W, C) of the uint8 images this sampler returns (decoded from latents for a text-to-image model)."""
        if self.pipeline is not None:
            scale = self.pipeline.spec.vae_scale
            return self.spec.height * scale, self.spec.width * scale, self.pipeline.spec.image_channels
        return self.spec.height, self.spec.width, self.spec.channels

    def close(self):
        if self.device_loop is not None:
            self.device_loop.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sample(self, n, steps=50, method="ddim", eta=0.0, seed=0, seeds=None, classes=None, guidance=None,
               batch_size=16, spacing=None, progress=None, callback=None, trajectory=False, *, prompt=None,
               negative_prompt=None):
        """Generate `n` images: uint8 (n, H, W, C) and one record per image (index, seed, class, status, error, ...).

        Image i uses seeds[i] (default seed + i) and is bit-identical whatever `batch_size`. `classes`: one int, a
        list cycled over the images, or "all". `guidance`: the classifier-free guidance scale (default: the model's
        recommended one when classes are given; 1 = the conditional model alone, 0 = the null class alone).
        `progress(done, total)` is called after every step; `callback(step, timestep, x, first_index)` sees each
        chunk's latents after each step; `trajectory=k` adds x_t and predicted-x0 snapshots every k steps.
        """
        request = self.request(n, steps, method, eta, seed, seeds, classes, guidance, batch_size, spacing, trajectory,
                               prompt=prompt, negative_prompt=negative_prompt)
        return self.run(request, progress=progress, callback=callback)

    def stream(self, n, steps=50, method="ddim", eta=0.0, seed=0, seeds=None, classes=None, guidance=None,
               batch_size=16, spacing=None, progress=None, callback=None, trajectory=False, *, prompt=None,
               negative_prompt=None):
        """Like `sample`, but yields each finished Chunk (start, images, records) instead of keeping them all."""
        request = self.request(n, steps, method, eta, seed, seeds, classes, guidance, batch_size, spacing, trajectory,
                               prompt=prompt, negative_prompt=negative_prompt)
        return self.chunks(request, progress=progress, callback=callback)

    def request(self, n, steps=50, method="ddim", eta=0.0, seed=0, seeds=None, classes=None, guidance=None,
                batch_size=16, spacing=None, trajectory=False, *, prompt=None, negative_prompt=None):
        """Validate sampling parameters against this model and machine (InvalidParameterError otherwise)."""
        if trajectory and self.pipeline is not None:
            raise InvalidParameterError("trajectory snapshots are of pixel-space models; this is a latent text-to-image model")
        request = make_request(self.spec, n, steps, method, eta, seed, seeds, classes, guidance, batch_size, spacing, trajectory,
                               prompt=prompt, negative_prompt=negative_prompt)
        check_memory(self.model, request, getattr(self.backend, "max_rows", None))
        self.plan(request)
        return request

    def plan(self, request):
        """The StepPlan (timesteps, coefficient rows, clip) of a request, made once per (steps, method, eta, spacing)."""
        key = request.plan_key
        plan = self._plans.get(key)
        if plan is None:
            plan = step_plan(self.spec, request)
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def run(self, request, *, progress=None, callback=None, timers=None):
        """Sample a validated request; all images at once (see `chunks` for a stream)."""
        check_memory(self.model, request, keep_images=True, image_elements=math.prod(self.image_shape))
        chunks = list(self.chunks(request, progress=progress, callback=callback, timers=timers))
        images = np.concatenate([c.images for c in chunks])
        return images, [r for c in chunks for r in c.records]

    def chunks(self, request, *, progress=None, callback=None, timers=None):
        """Yield each Chunk of `request.batch_size` images as soon as it is sampled."""
        plan, b = self.plan(request), request.batch_size
        total = request.n * request.steps
        for start in range(0, request.n, b):
            part = slice(start, min(start + b, request.n))
            seeds = np.ascontiguousarray(request.seeds[part])
            classes = None if request.classes is None else request.classes[part]

            def on_step(i, *_, start=start, k=part.stop - part.start):
                if progress is not None:
                    progress(start * request.steps + (i + 1) * k, total)

            trajectory = [] if request.trajectory else None
            conditions = None if self.pipeline is None else self.pipeline.conditions(
                request.prompts[part], request.negative_prompts[part], request.guidance)[0]
            if self.device_loop is not None and trajectory is None and callback is None:
                x, bad = self.device_loop.denoise(plan, seeds, classes, request.guidance, on_step=on_step, timers=timers,
                                                  conditions=conditions)
            else:  # per-step host access (trajectory, callback) or a CPU backend
                step_hook = on_step if callback is None else _with_callback(on_step, callback, start)
                observe = None if trajectory is None else _snapshots(trajectory, plan, request)
                x, bad = self.host_loop.denoise(plan, seeds, classes, request.guidance, on_step=step_hook,
                                                observe=observe, timers=timers, conditions=conditions)
            x, bad, value_range = self.finish(x, bad, len(plan), b)
            images = to_uint8(x, value_range)
            yield Chunk(start, images, self.records(request, part, bad, trajectory))

    def finish(self, x, bad, steps, batch_size):
        """(images as floats, bad, their value range): latents decoded by the VAE for a text-to-image model;
        an image whose values are non-finite gets its step in `bad` (`steps` when only the decoder made it so)."""
        value_range = self.spec.value_range
        if self.pipeline is not None:
            x = self.pipeline.decode(np.where(np.isfinite(x), x, np.float32(0)), batch_size)
            bad = np.where((bad < 0) & ~np.isfinite(x.reshape(len(x), -1)).all(axis=1), steps, bad)
            value_range = (-1.0, 1.0)
        if (bad >= 0).any():  # failed images are black (never shown: their records say "error"), and no NaN is cast
            x = np.where((bad >= 0).reshape(-1, *[1] * (x.ndim - 1)), np.float32(value_range[0]), x)
        return x, bad, value_range

    def records(self, request, part, bad, trajectory):
        common = {**request.params(), "model_sha256": self.model.sha256, "backend": self.backend.name,
                  "precision": getattr(self.backend, "precision", "fp32"), "ddengine_version": ddengine.__version__}
        if self.scheduler_override is not None:
            common["scheduler"] = self.scheduler_override
        records = []
        for j, index in enumerate(range(part.start, part.stop)):
            seed = int(request.seeds[index])
            record = {"index": index, "seed": seed,
                      "class": None if request.classes is None else int(request.classes[index]),
                      "status": "ok", "error": None, **common}
            if request.prompts is not None:
                record.update(prompt=request.prompts[index], negative_prompt=request.negative_prompts[index])
            if bad[j] >= 0:
                record.update(status="error", error=f"image {index} (seed {seed}) became non-finite (NaN/inf) at step {bad[j]}")
            elif trajectory is not None:
                record["trajectory"] = {
                    "steps": [s[0] for s in trajectory], "timesteps": [s[1] for s in trajectory],
                    "x_t": to_uint8(np.stack([s[2][j] for s in trajectory]), self.spec.value_range),
                    "x0": to_uint8(np.stack([s[3][j] for s in trajectory]), self.spec.value_range)}
            records.append(record)
        return records


def _with_callback(on_step, callback, first_index):
    def hook(i, t, x):
        on_step(i)
        callback(i, t, x, first_index)
    return hook


def _snapshots(into, plan, request):
    """An observe hook appending (step, t, x_t, predicted x0) every `request.trajectory` steps and at the last."""
    def observe(i, t, x, out, n):
        if i % request.trajectory == 0 or i == len(plan) - 1:
            uncond = out[n:2 * n] if len(out) == 2 * n else None
            m = guided_output(out[:n], uncond, request.guidance)
            into.append((i, t, x.copy(), predicted_x0(x, m, plan.coeffs[i], plan.clip).astype(np.float32)))
    return observe


def step_plan(spec, request):
    """The StepPlan of a request for a model: its parsed schedule, with the request's timestep spacing if given."""
    from dataclasses import replace

    from ddengine.plan import make_plan

    config = spec.schedule if request.spacing is None else replace(spec.schedule, timestep_spacing=request.spacing)
    try:
        return make_plan(config, request.steps, method=request.method, eta=request.eta)
    except ValueError as err:
        raise InvalidParameterError(str(err)) from None


def to_uint8(x, value_range=(-1.0, 1.0)):
    """NCHW floats in value_range -> NHWC uint8: (x - lo)/(hi - lo) clipped to [0, 1], *255, rounded."""
    lo, hi = value_range
    unit = np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
