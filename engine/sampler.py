"""The Python API: `Sampler(model).sample(n, steps=50, ...)` -> uint8 images and one record per image."""
import math
import numbers
import time
from dataclasses import dataclass

import numpy as np

from ddengine.backends import create_backend
from ddengine.coeffs import AM, AX
from ddengine.model import Model, load_model
from ddengine.reference import guided_output

METHODS = ("ddim", "ddpm")
SPACINGS = ("leading", "trailing", "linspace")
SEED_LIMIT = 2**64


class InvalidParameterError(ValueError):
    """A sampling parameter is out of range; the message names the expected and the given value."""


@dataclass(frozen=True)
class Request:
    """A validated sampling request: one seed and one class label (or None) per image."""

    steps: int
    method: str
    eta: float
    seeds: np.ndarray  # uint64 (n,)
    classes: np.ndarray | None  # int64 (n,) or None (the model's null class / unconditional)
    guidance: float | None
    batch_size: int
    spacing: str | None
    trajectory: int  # 0 = none, else a snapshot every `trajectory` steps

    @property
    def n(self):
        return len(self.seeds)


class Sampler:
    """Samples a ddengine ONNX model; one backend session shared by every call (thread-safe)."""

    def __init__(self, model=None, backend="auto", scheduler_config=None, *, threads=None):
        if threads is not None:
            _int("threads", threads, 1)
        self.model = model if isinstance(model, Model) else load_model(model, scheduler_config)
        self.spec = self.model.spec
        self.backend = create_backend(backend, self.model, threads=threads)
        self.threads = threads or 0
        self._plans = {}  # (steps, method, eta, spacing) -> (StepPlan, float32 rows); both read-only
        self._gpu = None  # GPU backends (TensorRT, ORT CUDA) run the whole loop on the device
        if callable(getattr(self.backend, "open_runner", None)):
            from ddengine.gpu_sampler import GpuSampling

            self._gpu = GpuSampling(self.backend)

    def close(self):
        if self._gpu is not None:
            self._gpu.close()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def sample(self, n, steps=50, method="ddim", eta=0.0, seed=0, seeds=None, classes=None, guidance=None,
               batch_size=16, spacing=None, progress=None, callback=None, trajectory=False):
        """Generate `n` images: returns uint8 (n, H, W, C) and records (index, seed, class, status, error).

        Image i uses seeds[i] (default seed + i) and is bit-identical whatever `batch_size`.
        `progress(done, total)` is called after every step of every chunk; `callback(step, timestep, x,
        first_index)` sees each chunk's latents after each step. With `trajectory=k` each record gets
        `trajectory`: {"steps", "timesteps", "x_t", "x0"} snapshots (uint8) every k steps and at the last.
        """
        request = self.request(n, steps, method, eta, seed, seeds, classes, guidance, batch_size, spacing, trajectory)
        return self.run(request, progress=progress, callback=callback)

    def request(self, n, steps=50, method="ddim", eta=0.0, seed=0, seeds=None, classes=None, guidance=None,
                batch_size=16, spacing=None, trajectory=False):
        """Validate sampling parameters against this model (InvalidParameterError otherwise)."""
        return make_request(self.spec, n, steps, method, eta, seed, seeds, classes, guidance, batch_size, spacing, trajectory)

    def plan(self, request):
        """The StepPlan (timesteps, coefficient rows, clip) for a request."""
        return self._plan_and_rows(request)[0]

    def _plan_and_rows(self, request):
        """The request's StepPlan and its float32 rows, computed once per (steps, method, eta, spacing)."""
        key = (request.steps, request.method, request.eta, request.spacing)
        if key not in self._plans:
            plan = step_plan(self.spec, request)
            if len(self._plans) >= 64:
                self._plans.clear()
            self._plans[key] = (plan, plan.rows_float32())
        return self._plans[key]

    def run(self, request, *, progress=None, callback=None, timers=None):
        """Sample a validated request chunk by chunk; `timers` (a dict) accumulates forward/step seconds."""
        plan, rows = self._plan_and_rows(request)
        c, h, w = self.spec.channels, self.spec.height, self.spec.width
        images = np.zeros((request.n, h, w, c), dtype=np.uint8)
        records = []
        chunks = math.ceil(request.n / request.batch_size)
        for k in range(chunks):
            start = k * request.batch_size
            chunk = slice(start, min(start + request.batch_size, request.n))

            def chunk_progress(i, k=k):
                if progress is not None:
                    progress(k * request.steps + i + 1, chunks * request.steps)

            if self._gpu is not None and not request.trajectory and callback is None:
                x, bad, trajectory = self._denoise_on_gpu(request, plan, chunk, timers)
                chunk_progress(request.steps - 1)
            else:  # per-step host access (trajectory, callback) or a CPU backend
                x, bad, trajectory = self._denoise(request, plan, rows, chunk, chunk_progress, callback, timers)
            x[bad >= 0] = 0.0  # failed images come back all zero and are marked "error" in their record
            images[chunk] = to_uint8(x, self.spec.value_range)
            images[chunk][bad >= 0] = 0
            records.extend(self._records(request, chunk, bad, trajectory))
        return images, records

    def _denoise(self, request, plan, rows, chunk, on_step, callback, timers):
        """fill_noise, then per step: one forward (batch doubled for CFG) and one fused step in place."""
        from ddengine import _kernels

        seeds = np.ascontiguousarray(request.seeds[chunk])
        b, cfg = len(seeds), request.guidance is not None
        shape = (b, self.spec.channels, self.spec.height, self.spec.width)
        # With CFG, x is the second half of the doubled forward batch: one copy per step fills the first half.
        x_in = np.empty(((2 if cfg else 1) * b, *shape[1:]), dtype=np.float32)
        x = x_in[b:] if cfg else x_in
        _kernels.fill_noise(x, seeds, threads=self.threads)
        labels = self._labels(request, chunk)
        out = np.empty(x_in.shape, dtype=np.float32)
        bad = np.full(b, -1, dtype=np.int64)  # first step at which image j went non-finite
        snaps = [] if request.trajectory else None
        clock = time.perf_counter
        for i, t in enumerate(plan.timesteps):
            t0 = clock()
            if cfg:
                x_in[:b] = x
            self.backend.run(x_in, int(t), labels, out)
            t1 = clock()
            if snaps is not None and (i % request.trajectory == 0 or i == len(rows) - 1):
                snaps.append((i, int(t), x.copy(), predicted_x0(x, out, plan.coeffs[i], request.guidance, plan.clip)))
            _kernels.step(x, out, rows[i], seeds, i, guidance=request.guidance, clip=plan.clip, threads=self.threads)
            t2 = clock()
            _mark_nonfinite(bad, i, out)
            if timers is not None:
                timers["forward"] = timers.get("forward", 0.0) + (t1 - t0)
                timers["step"] = timers.get("step", 0.0) + (t2 - t1)
            if callback is not None:
                callback(i, int(t), x, chunk.start)
            on_step(i)
        _mark_nonfinite(bad, len(rows) - 1, x)  # an update that overflowed without a non-finite model output
        return x, bad, snaps

    def _denoise_on_gpu(self, request, plan, chunk, timers):
        """The same loop on the device (ddengine.gpu_sampler): noise, forwards and fused steps never leave the GPU."""
        start = time.perf_counter()
        x, bad = self._gpu.denoise(plan, np.ascontiguousarray(request.seeds[chunk]), self._labels(request, chunk), request.guidance)
        if timers is not None:
            timers["forward"] = timers.get("forward", 0.0) + time.perf_counter() - start
        return x, bad, None

    def _labels(self, request, chunk):
        """Class labels for the forward: None (unconditional), the chunk's classes, or [null; classes] for CFG."""
        if not self.spec.conditional:
            return None
        b = chunk.stop - chunk.start
        null = np.full(b, self.spec.null_class if self.spec.null_class is not None else 0, dtype=np.int64)
        classes = request.classes[chunk] if request.classes is not None else null
        return np.concatenate([null, classes]) if request.guidance is not None else np.ascontiguousarray(classes)

    def _records(self, request, chunk, bad, trajectory):
        for j, index in enumerate(range(chunk.start, chunk.stop)):
            record = {"index": index, "seed": int(request.seeds[index]),
                      "class": None if request.classes is None else int(request.classes[index]),
                      "status": "ok", "error": None}
            if bad[j] >= 0:
                record.update(status="error", error=f"image {index} (seed {record['seed']}) became non-finite (NaN/inf) at step {bad[j]}")
            elif trajectory is not None:
                record["trajectory"] = {
                    "steps": [s[0] for s in trajectory], "timesteps": [s[1] for s in trajectory],
                    "x_t": to_uint8(np.stack([s[2][j] for s in trajectory]), self.spec.value_range),
                    "x0": to_uint8(np.stack([s[3][j] for s in trajectory]), self.spec.value_range)}
            yield record


def step_plan(spec, request):
    """The StepPlan of a request for a model: its schedule, with the request's timestep spacing if given."""
    from ddengine.plan import make_plan
    from ddengine.schedule import SchedulerConfig

    scheduler = dict(spec.scheduler)
    if request.spacing is not None:
        scheduler["timestep_spacing"] = request.spacing
    try:
        return make_plan(SchedulerConfig.from_dict(scheduler), request.steps, method=request.method, eta=request.eta)
    except ValueError as err:
        raise InvalidParameterError(str(err)) from None


def _mark_nonfinite(bad, step, values):
    """Record `step` for images whose values (B or 2B rows for CFG) are NaN/inf; first failure wins."""
    b = len(bad)
    finite = np.isfinite(values.reshape(len(values) // b, b, -1)).all(axis=(0, 2))
    if not finite.all():  # the common case costs two numpy calls: this runs after every forward
        bad[(bad < 0) & ~finite] = step


def predicted_x0(x, model_out, row, guidance, clip):
    """x0 = ax*x + am*m (clipped), the model's estimate of the clean image at this step (float32)."""
    m = guided_output(model_out, guidance)
    x0 = (row[AX] * x.astype(np.float64) + row[AM] * m).astype(np.float32)
    return np.clip(x0, -clip, clip) if clip is not None else x0


def to_uint8(x, value_range=(-1.0, 1.0)):
    """NCHW floats in value_range -> NHWC uint8: (x - lo)/(hi - lo) clipped to [0, 1], *255, rounded."""
    lo, hi = value_range
    unit = np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(unit * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def make_request(spec, n, steps=50, method="ddim", eta=0.0, seed=0, seeds=None, classes=None, guidance=None,
                 batch_size=16, spacing=None, trajectory=False):
    """Check every parameter against the model's spec; raise InvalidParameterError naming expected vs given."""
    num_train = int(spec.scheduler.get("num_train_timesteps", 1000))
    _int("n", n, 1)
    _int("steps", steps, 1, num_train)
    _choice("method", method, METHODS)
    _real("eta", eta)
    if method == "ddpm" and eta != 0:
        raise InvalidParameterError(f"eta applies to method 'ddim' only; got eta={eta!r} with method 'ddpm'")
    _int("batch_size", batch_size, 1)
    if spacing is not None:
        _choice("spacing", spacing, SPACINGS)
    k = 0 if trajectory is False or trajectory is None else trajectory
    if k != 0:
        _int("trajectory", k, 1)
    return Request(steps=steps, method=method, eta=float(eta), seeds=_seeds(n, seed, seeds),
                   classes=_classes(spec, n, classes), guidance=_guidance(spec, guidance, classes),
                   batch_size=batch_size, spacing=spacing, trajectory=k)


def _int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidParameterError(f"{name} must be {bound}, got {value}")


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise InvalidParameterError(f"{name} must be a finite number >= 0, got {value!r}")


def _choice(name, value, allowed):
    if value not in allowed:
        raise InvalidParameterError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _seeds(n, seed, seeds):
    """seeds[i] (default seed + i) as uint64, each in [0, 2**64)."""
    if seeds is None:
        _int("seed", seed, 0, SEED_LIMIT - n)
        return np.arange(n, dtype=np.uint64) + np.uint64(seed)
    if seed != 0:
        raise InvalidParameterError(f"pass seed or seeds, not both (got seed={seed!r} and {len(list(seeds))} seeds)")
    seeds = list(seeds)
    if len(seeds) != n:
        raise InvalidParameterError(f"seeds must have n = {n} entries, got {len(seeds)}")
    for s in seeds:
        _int("each seed", s, 0, SEED_LIMIT - 1)
    return np.array(seeds, dtype=np.uint64)


def _classes(spec, n, classes):
    """None, or one int64 label per image in [0, num_classes)."""
    if classes is None:
        if spec.conditional and spec.null_class is None:
            raise InvalidParameterError(f"the model is class-conditional ({spec.num_classes} classes) and has no null class; pass classes")
        return None
    if not spec.conditional:
        raise InvalidParameterError(f"classes={classes!r} given but the model is unconditional (num_classes = 0)")
    labels = [classes] * n if isinstance(classes, numbers.Integral) and not isinstance(classes, bool) else list(classes)
    if len(labels) != n:
        raise InvalidParameterError(f"classes must be one int or a list of n = {n} ints, got {len(labels)} entries")
    for c in labels:
        _int("class", c, 0, spec.num_classes - 1)
    return np.array(labels, dtype=np.int64)


def _guidance(spec, guidance, classes):
    if guidance is None:
        return None
    _real("guidance", guidance)
    if not spec.conditional:
        raise InvalidParameterError(f"guidance={guidance!r} needs a class-conditional model; this model is unconditional")
    if spec.null_class is None:
        raise InvalidParameterError("guidance needs the model's null class (classifier-free guidance); the model's spec has null_class = None")
    if classes is None:
        raise InvalidParameterError(f"guidance={guidance!r} needs classes (it steers towards them)")
    return float(guidance)
