"""A loaded model's parts, chosen once at load time: the U-Net (its Model and backend), its conditioner and decoder
(engine/runtime/conditioning.py, or the text-to-image ones of engine/text/pipeline.py, with the VAE encoder that
makes a latent model's image-to-image start), its step plans, and how finished x_0 become images and manifest
records. The Sampler and the StepBatcher both run on Parts.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import ddengine
from ddengine.backends import create_backend
from ddengine.model.load import Model, load_model
from ddengine.runtime.conditioning import PixelDecoder, class_conditioner
from ddengine.runtime.init_state import InitError, encode_init
from ddengine.runtime.params import InvalidParameterError

PLAN_CACHE = 64


@dataclass(frozen=True)
class Chunk:
    """Images start .. start + len(images) - 1 of a request: uint8 (k, H, W, C) and their records."""

    start: int
    images: np.ndarray
    records: list


class Parts:
    """One model's U-Net backend, conditioner and decoder, with the plans of the requests made of it."""

    def __init__(self, model, backend, conditioner, decoder, *, threads=0, scheduler_override=None, encoder=None):
        self.model, self.spec, self.backend = model, model.spec, backend
        self.conditioner, self.decoder, self.threads = conditioner, decoder, threads
        self.encoder = encoder  # a latent model's VAE encoder (engine/text/pipeline.py VaeEncoder), or None
        self.scheduler_override = scheduler_override  # a manifest says which schedule replaced the model's own
        self._plans = {}  # Request.plan_key -> StepPlan (read-only)

    @property
    def image_shape(self):
        """(H, W, C) of the uint8 images (decoded from latents for a text-to-image model)."""
        return self.decoder.image_shape

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

    def encode_start(self, request):
        """The request with a latent model's image and mask in latent space (init_state.encode_init: the VAE encoder,
        once per request); any other request as it is."""
        if request.init is None or request.init.pixels is None:
            return request
        try:
            return replace(request, init=encode_init(request.init, self.encoder, request.batch_size))
        except InitError as err:
            raise InvalidParameterError(str(err)) from None

    def finish(self, request, part, x, nonfinite_step, trajectory=None):
        """The Chunk of images `part` of a request from their x_0 and first non-finite steps (-1: none).

        The decoder makes images of the finite latents; an image it made non-finite fails at the plan's last step.
        Failed images are black (never shown: their records say "error"), and no NaN is cast.
        """
        x = self.decoder.decode(np.where(np.isfinite(x), x, np.float32(0)), request.batch_size)
        last = len(self.plan(request))
        bad = np.where((nonfinite_step < 0) & ~np.isfinite(x.reshape(len(x), -1)).all(axis=1), last, nonfinite_step)
        low, _ = value_range = self.decoder.value_range
        if (bad >= 0).any():
            x = np.where((bad >= 0).reshape(-1, *[1] * (x.ndim - 1)), np.float32(low), x)
        return Chunk(part.start, to_uint8(x, value_range), self.records(request, part, bad, trajectory))

    def preview(self, request, x0):
        """uint8 previews of a request's images from the kernel's x0 predictions (non-finite values as 0)."""
        x = self.decoder.decode(np.where(np.isfinite(x0), x0, np.float32(0)), request.batch_size)
        return to_uint8(np.where(np.isfinite(x), x, np.float32(0)), self.decoder.value_range)

    def records(self, request, part, bad, trajectory):
        """One manifest record per image: index, seed, class or prompts, status, parameters, model and backend."""
        common = {
            **request.params(),
            "model_sha256": self.model.sha256,
            "backend": self.backend.name,
            "precision": self.backend.precision,
            "ddengine_version": ddengine.__version__,
        }
        if self.scheduler_override is not None:
            common["scheduler"] = self.scheduler_override
        records = []
        for j, index in enumerate(range(part.start, part.stop)):
            seed = int(request.seeds[index])
            record = {
                "index": index,
                "seed": seed,
                "class": None if request.classes is None else int(request.classes[index]),
                "status": "ok",
                "error": None,
                **common,
            }
            if request.prompts is not None:
                record.update(prompt=request.prompts[index], negative_prompt=request.negative_prompts[index])
            if bad[j] >= 0:
                record.update(
                    status="error", error=f"image {index} (seed {seed}) became non-finite (NaN/inf) at step {bad[j]}"
                )
            elif trajectory is not None:
                record["trajectory"] = {
                    "steps": [s[0] for s in trajectory],
                    "timesteps": [s[1] for s in trajectory],
                    "x_t": to_uint8(np.stack([s[2][j] for s in trajectory]), self.spec.value_range),
                    "x0": to_uint8(np.stack([s[3][j] for s in trajectory]), self.spec.value_range),
                }
            records.append(record)
        return records

    def close(self):
        self.backend.close()


def open_parts(model=None, backend="auto", scheduler_config=None, *, threads=None, precision="auto"):
    """The Parts of a model: an ONNX file (None: the shipped one), a loaded Model, or a text-to-image folder."""
    encoder = None
    if isinstance(model, (str, Path)) and Path(model).is_dir():  # a text-to-image MODEL_DIR (pipeline.json checked)
        from ddengine.text.pipeline import open_text_model

        loaded, conditioner, decoder, encoder = open_text_model(model, scheduler_config, backend, precision, threads)
    else:
        loaded = model if isinstance(model, Model) else load_model(model, scheduler_config)
        conditioner, decoder = class_conditioner(loaded.spec), PixelDecoder(loaded.spec)
    override = None if scheduler_config is None else dict(loaded.spec.scheduler)
    unet = create_backend(backend, loaded, threads=threads, precision=precision)
    return Parts(loaded, unet, conditioner, decoder, threads=threads or 0, scheduler_override=override, encoder=encoder)


def step_plan(spec, request):
    """The StepPlan of a request for a model: its parsed schedule, with the request's timestep spacing if given."""
    from ddengine.core.plan import make_plan

    config = spec.schedule if request.spacing is None else replace(spec.schedule, timestep_spacing=request.spacing)
    try:
        return make_plan(
            config,
            request.steps,
            method=request.method,
            eta=request.eta,
            options=spec.solver_options,
            start=request.start,
        )
    except ValueError as err:
        raise InvalidParameterError(str(err)) from None


def preview_steps(evaluations, previews):
    """{steps done: k} for `previews` previews spread evenly over a plan's model evaluations (none at the end)."""
    at = {max(1, round(k * evaluations / (previews + 1))) for k in range(1, previews + 1)}
    return {step: k for k, step in enumerate(sorted(s for s in at if s < evaluations))}


def to_uint8(x, value_range=(-1.0, 1.0)):
    """NCHW floats in value_range -> NHWC uint8: (x - lo)/(hi - lo) clipped to [0, 1], *255, rounded."""
    lo, hi = value_range
    unit = np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
