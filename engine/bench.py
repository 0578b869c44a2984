"""Latency benchmarks: the fused engine against the bare-forward floor, ORT + numpy, and diffusers + torch."""
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ddengine.coeffs import SIGMA
from ddengine.reference import reference_step

TORCH_UNAVAILABLE = "torch model unavailable"


@dataclass
class Row:
    """One measured configuration: wall time of one batch through all steps, and where it went."""

    name: str
    batch: int
    steps: int
    seconds: float | None = None  # median over repeats
    forward_s: float | None = None
    step_s: float | None = None
    other_s: float | None = None
    note: str = ""
    runs: list = field(default_factory=list)  # every timed run; min(runs) is the least disturbed by other load

    @property
    def ms_per_step(self):
        return None if self.seconds is None else 1e3 * self.seconds / self.steps

    @property
    def images_per_s(self):
        return None if self.seconds is None else self.batch / self.seconds

    def to_dict(self):
        return {**asdict(self), "ms_per_step": self.ms_per_step, "images_per_s": self.images_per_s}


def _row(name, request, runs):
    """The run closest to the median of `runs` (dicts with seconds, forward, step) as a Row."""
    mid = statistics.median(r["seconds"] for r in runs)
    best = min(runs, key=lambda r: abs(r["seconds"] - mid))
    forward, step = best.get("forward", best["seconds"]), best.get("step", 0.0)
    return Row(name, request.n, request.steps, best["seconds"], forward, step, best["seconds"] - forward - step,
               runs=[r["seconds"] for r in runs])


def measure(runners, request, repeats=3, warmup=1):
    """Time each runner (name -> once() -> dict) round-robin, so background load hits all of them alike.

    The order rotates every round: no runner always follows the same one (torch's OpenMP threads, for
    one, are still spinning when its run returns and would slow whichever runner comes next).
    """
    for once in runners.values():
        for _ in range(warmup):
            once()
    names, runs = list(runners), {name: [] for name in runners}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(runners[name]())
    return [_row(name, request, runs[name]) for name in names]


def engine_runner(sampler, request):
    """The product: Sampler.run (fill_noise, forward, fused step) with its forward/step timers."""
    def once():
        timers, start = {"forward": 0.0, "step": 0.0}, time.perf_counter()
        sampler.run(request, timers=timers)
        return {"seconds": time.perf_counter() - start, **timers}
    return once


def _forward_inputs(sampler, request):
    """The (possibly CFG-doubled) batch, labels and output buffer the engine's forward sees."""
    spec, b = sampler.spec, request.n
    rows = 2 * b if request.guidance is not None else b
    x = np.random.default_rng(0).standard_normal((rows, spec.channels, spec.height, spec.width), dtype=np.float32)
    labels = sampler._labels(request, slice(0, b))
    return x, labels, np.empty_like(x)


def floor_runner(sampler, request):
    """(c) the floor: `steps` bare backend forwards on the same batch, nothing else."""
    timesteps = sampler.plan(request).timesteps
    x, labels, out = _forward_inputs(sampler, request)

    def once():
        start = time.perf_counter()
        for t in timesteps:
            sampler.backend.run(x, int(t), labels, out)
        return {"seconds": time.perf_counter() - start}
    return once


def numpy_runner(sampler, request):
    """(b) ONNX Runtime forward + the unfused numpy step (reference_step in float32, numpy standard_normal noise)."""
    plan = sampler.plan(request)
    _, labels, _ = _forward_inputs(sampler, request)
    spec, b, cfg = sampler.spec, request.n, request.guidance is not None
    shape = (b, spec.channels, spec.height, spec.width)

    def once():
        rng, fwd, stp = np.random.default_rng(0), 0.0, 0.0
        start = time.perf_counter()
        x = rng.standard_normal(shape, dtype=np.float32)
        for i, t in enumerate(plan.timesteps):
            t0 = time.perf_counter()
            x_in = np.concatenate([x, x]) if cfg else x
            out = np.empty_like(x_in)
            sampler.backend.run(x_in, int(t), labels, out)
            t1 = time.perf_counter()
            noise = rng.standard_normal(shape, dtype=np.float32) if plan.coeffs[i, SIGMA] != 0 else None
            x = reference_step(x, out, plan.coeffs[i], noise, guidance=request.guidance, clip=plan.clip, dtype=np.float32)
            fwd, stp = fwd + t1 - t0, stp + time.perf_counter() - t1
        return {"seconds": time.perf_counter() - start, "forward": fwd, "step": stp}
    return once


def load_torch_model(sampler, checkpoint=None):
    """The torch U-Net behind the sampler's ONNX model, or (None, reason).

    From `checkpoint` (a training checkpoint, via ddengine.export) when given, else from ddengine.export's
    `load_torch_model_for(onnx_path)` hook; either way it must compute the same function as the ONNX model.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        return None, f"{TORCH_UNAVAILABLE} (torch is not installed)"
    try:
        if checkpoint is not None:
            from ddengine.export.onnx_export import load_checkpoint_module

            net = load_checkpoint_module(checkpoint)[0]
        else:
            from ddengine.export.onnx_export import load_torch_model_for

            net = load_torch_model_for(sampler.model.path)
    except ImportError as err:
        return None, f"{TORCH_UNAVAILABLE} (no torch twin of {sampler.model.path.name}: {err}; pass --torch-checkpoint)"
    except Exception as err:  # a checkpoint that is missing or not a ddengine U-Net
        return None, f"{TORCH_UNAVAILABLE} ({type(err).__name__}: {err})"
    error = twin_error(net, sampler)
    if not error < 1e-3:
        return None, f"{TORCH_UNAVAILABLE} (the torch model differs from {sampler.model.path.name}: max abs error {error:.3g})"
    return net, ""


def twin_error(net, sampler, batch=2):
    """Max abs difference between the torch module and the ONNX backend on one random input."""
    import torch

    spec = sampler.spec
    x = np.random.default_rng(0).standard_normal((batch, spec.channels, spec.height, spec.width), dtype=np.float32)
    labels = np.arange(batch, dtype=np.int64) % spec.num_classes if spec.conditional else None
    onnx_out = sampler.backend.run(x, 500, labels, np.empty_like(x))
    with torch.inference_mode():
        t = torch.full((batch,), 500, dtype=torch.int64)
        torch_out = net(torch.from_numpy(x), t, None if labels is None else torch.from_numpy(labels)).float().numpy()
    return float(np.abs(onnx_out - torch_out).max())


def diffusers_runner(net, sampler, request, precision="fp32"):
    """(a) the diffusers way: the torch U-Net in a DDIMScheduler/DDPMScheduler loop (fp32 or bf16 autocast)."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

    spec, b, cfg = sampler.spec, request.n, request.guidance is not None
    config = dict(spec.scheduler)
    if request.spacing is not None:
        config["timestep_spacing"] = request.spacing
    scheduler = (DDIMScheduler if request.method == "ddim" else DDPMScheduler).from_config(config)
    labels = sampler._labels(request, slice(0, b))
    labels = None if labels is None else torch.from_numpy(labels)
    shape = (b, spec.channels, spec.height, spec.width)
    extra = {"eta": request.eta} if request.method == "ddim" else {}

    def once():
        generator, fwd, stp = torch.Generator().manual_seed(0), 0.0, 0.0
        start = time.perf_counter()
        scheduler.set_timesteps(request.steps)
        x = torch.randn(shape, generator=generator)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            for t in scheduler.timesteps:
                t0 = time.perf_counter()
                x_in = torch.cat([x, x]) if cfg else x
                out = net(x_in, t.expand(len(x_in)), labels).float()
                if cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + request.guidance * (cond - uncond)
                t1 = time.perf_counter()
                x = scheduler.step(out, t, x, generator=generator, **extra).prev_sample
                fwd, stp = fwd + t1 - t0, stp + time.perf_counter() - t1
        return {"seconds": time.perf_counter() - start, "forward": fwd, "step": stp}
    return once


FUSED, FLOOR, NUMPY = "ddengine fused", "floor: bare forward x steps", "ORT + numpy step (unfused)"


def diffusers_name(precision):
    return f"diffusers + torch {precision}"


def run_benchmarks(sampler, batches, steps=50, method="ddim", eta=0.0, guidance=None, repeats=3, baselines=True, log=None,
                   torch_checkpoint=None):
    """Every configuration for every batch size, interleaved per batch; rows: engine, floor, numpy, diffusers."""
    net, why = load_torch_model(sampler, torch_checkpoint) if baselines else (None, "")
    rows = []
    for batch in batches:
        classes = [i % sampler.spec.num_classes for i in range(batch)] if sampler.spec.conditional else None
        request = sampler.request(batch, steps, method, eta, classes=classes, guidance=guidance, batch_size=batch)
        runners = {FUSED: engine_runner(sampler, request), FLOOR: floor_runner(sampler, request)}
        if baselines:
            runners[NUMPY] = numpy_runner(sampler, request)
            if net is not None:
                for precision in ("fp32", "bf16"):
                    runners[diffusers_name(precision)] = diffusers_runner(net, sampler, request, precision)
        measured = measure(runners, request, repeats)
        if baselines and net is None:
            measured += [Row(diffusers_name(p), batch, steps, note=why) for p in ("fp32", "bf16")]
        for row in measured:
            if log is not None:
                log(row)
            rows.append(row)
    return rows


def summary(rows):
    """Per batch: fused total / floor and the speed-up over diffusers fp32, of medians and of best runs (None: not measured)."""
    out = {}
    for batch in sorted({r.batch for r in rows}):
        by_name = {r.name: r for r in rows if r.batch == batch}
        fused, floor, torch32 = by_name[FUSED], by_name[FLOOR], by_name.get(diffusers_name("fp32"))
        measured = torch32 is not None and torch32.seconds is not None
        out[str(batch)] = {
            "fused_over_floor": fused.seconds / floor.seconds,
            "fused_over_floor_best": min(fused.runs) / min(floor.runs) if fused.runs and floor.runs else None,
            "speedup_vs_diffusers_fp32": torch32.seconds / fused.seconds if measured else None,
            "speedup_vs_diffusers_fp32_best": min(torch32.runs) / min(fused.runs) if measured and torch32.runs else None}
    return out


def machine():
    """What the numbers were measured on."""
    import onnxruntime

    from ddengine.backends.ort import physical_cores

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "physical_cores": physical_cores(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "load_average_1_5_15min": _load()}


def _load():
    """The 1/5/15-minute load averages: other work on the machine while measuring (None where unknown)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
