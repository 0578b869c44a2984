"""Latency benchmarks: the product's own loop (Sampler.run) on each backend, next to its bare-forward floor and
the baselines a user would run instead: ORT + a numpy step, the torch twin + diffusers' scheduler (fp32 and
bf16 autocast), and OpenVINO + diffusers' scheduler in torch (the optimum-intel way). Timed round-robin.
"""

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ddengine.backends.base import physical_cores
from ddengine.core.guidance import forward_rows, layout_rows
from ddengine.core.reference import reference_step
from ddengine.core.rows import SIGMA, SLOTS

TORCH_UNAVAILABLE = "torch model unavailable"
NOT_MEASURED = "forward and step not measured (a GPU backend's device loop enqueues both with no host timer between)"
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile", "avx_vnni")


@dataclass
class Row:
    """One measured configuration: wall time of one batch through all steps, and where it went."""

    name: str
    batch: int
    steps: int
    backend: str | None = None
    precision: str | None = None
    seconds: float | None = None  # the run closest to the median of `runs`
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


def engine_name(backend):
    return f"ddengine {backend}"


def floor_name(backend):
    return f"floor {backend}: bare forward x steps"


NUMPY = "ORT + numpy step (unfused)"
OPENVINO_DIFFUSERS = "OpenVINO + diffusers scheduler (optimum-intel way)"


def diffusers_name(precision):
    return f"torch {precision} + diffusers scheduler"


def measure(runners, repeats=3, warmup=1):
    """Time each runner (name -> once() -> dict) round-robin, so background load hits all of them alike.

    Every round runs them in a fresh (seeded) order, so no runner always follows the same one: torch's OpenMP
    threads, for one, are still spinning when its run returns and would slow whichever runner comes next.
    """
    for once in runners.values():
        for _ in range(warmup):
            once()
    names, runs = list(runners), {name: [] for name in runners}
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        for k in rng.permutation(len(names)):
            runs[names[k]].append(runners[names[k]]())
    return runs


def to_row(name, request, runs, **labels):
    """The run closest to the median of `runs` (dicts with seconds and, where measured, forward and step)."""
    mid = statistics.median(r["seconds"] for r in runs)
    best = min(runs, key=lambda r: abs(r["seconds"] - mid))
    forward, step = best.get("forward"), best.get("step")
    other = None if forward is None or step is None else best["seconds"] - forward - step
    return Row(
        name,
        request.n,
        request.steps,
        seconds=best["seconds"],
        forward_s=forward,
        step_s=step,
        other_s=other,
        note=best.get("note", ""),
        runs=[r["seconds"] for r in runs],
        **labels,
    )


def engine_runner(sampler, request):
    """The product: Sampler.run (noise, forwards, fused steps, uint8 images and records) with its timers; a loop
    that fills none (the GPU backends' device loop) has its forward and step NOT_MEASURED, not 0 s."""

    def once():
        timers, start = {}, time.perf_counter()
        sampler.run(request, timers=timers)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, **timers} if timers else {"seconds": seconds, "note": NOT_MEASURED}

    return once


def forward_feeds(sampler, request):
    """The forward rows the engine runs for this request (doubled under guidance) and an output buffer."""
    spec, b = sampler.spec, request.n
    conditioning = sampler.parts.conditioner.condition(request)
    guided = conditioning.guided
    rows = forward_rows(b, guided)
    x = np.random.default_rng(0).standard_normal((rows, *spec.image_shape), dtype=np.float32)
    feeds = {"sample": x}
    every = np.arange(b if guided else 0)
    for role, (own, uncond) in conditioning.inputs.items():
        feeds[role] = layout_rows(own, uncond, every, np.empty((rows, *own.shape[1:]), dtype=own.dtype))
    return feeds, np.empty_like(x), guided


def floor_runner(sampler, request):
    """The floor: `steps` bare backend forwards on the engine's rows, nothing else."""
    timesteps = sampler.plan(request).timesteps
    feeds, out, _ = forward_feeds(sampler, request)

    def once():
        start = time.perf_counter()
        for t in timesteps:
            sampler.backend.run({**feeds, "timestep": np.full(len(out), t, dtype=np.int64)}, out)
        return {"seconds": time.perf_counter() - start}

    return once


def numpy_runner(sampler, request):
    """The backend's forward + the unfused numpy step (reference_step in float32, numpy standard_normal noise)."""
    plan = sampler.plan(request)
    feeds, _, guided = forward_feeds(sampler, request)
    b = request.n

    def once():
        rng, fwd, stp = np.random.default_rng(0), 0.0, 0.0
        start = time.perf_counter()
        x = rng.standard_normal((b, *sampler.spec.image_shape), dtype=np.float32)
        slots = np.zeros((SLOTS, *x.shape), dtype=np.float32)
        for i, t in enumerate(plan.timesteps):
            t0 = time.perf_counter()
            x_in = np.concatenate([x, x]) if guided else x
            out = np.empty_like(x_in)
            sampler.backend.run(
                {**feeds, "sample": x_in, "timestep": np.full(len(x_in), t, dtype=plan.timesteps.dtype)}, out
            )
            t1 = time.perf_counter()
            noise = rng.standard_normal(x.shape, dtype=np.float32) if plan.coeffs[i, SIGMA] != 0 else None
            x = reference_step(
                x,
                out[:b],
                plan.coeffs[i],
                noise,
                uncond=out[b:] if guided else None,
                guidance=request.guidance,
                slots=slots,
                dtype=np.float32,
            )
            fwd, stp = fwd + t1 - t0, stp + time.perf_counter() - t1
        return {"seconds": time.perf_counter() - start, "forward": fwd, "step": stp}

    return once


def torch_twin(sampler, weights=None):
    """(the torch U-Net behind the sampler's ONNX model, "") or (None, why not).

    From `weights` (a twin .safetensors) or the twin next to the model (ddengine.nets.twin); it must compute
    the same function as the ONNX model run exactly (ONNX Runtime fp32; max abs error < 1e-3 on a random batch).
    """
    try:
        import torch  # noqa: F401

        from ddengine.nets.twin import TwinError, load_twin, twin_path
    except ImportError as err:
        return None, f"{TORCH_UNAVAILABLE} ({err}; pip install 'ddengine[export]')"
    try:
        net = load_twin(weights if weights is not None else twin_path(sampler.model.path))
    except TwinError as err:
        return None, f"{TORCH_UNAVAILABLE} ({err})"
    error = twin_error(net, sampler)
    if not error < 1e-3:
        return (
            None,
            f"{TORCH_UNAVAILABLE} (the torch model differs from {sampler.model.path.name}: max abs error {error:.3g})",
        )
    return net, ""


def twin_error(net, sampler, batch=2):
    """Max abs difference between the torch module and the ONNX model on ONNX Runtime fp32, on one random input."""
    import torch

    from ddengine.backends.ort import OrtBackend

    spec = sampler.spec
    x = np.random.default_rng(0).standard_normal((batch, *spec.image_shape), dtype=np.float32)
    labels = np.arange(batch, dtype=np.int64) % spec.num_classes if spec.conditional else None
    feeds = {"sample": x, "timestep": np.full(batch, 500, dtype=np.int64), "class_labels": labels}
    exact = OrtBackend(sampler.model)
    onnx_out = exact.run(feeds, np.empty_like(x))
    exact.close()
    with torch.inference_mode():
        t = torch.full((batch,), 500, dtype=torch.int64)
        torch_out = net(torch.from_numpy(x), t, None if labels is None else torch.from_numpy(labels)).float().numpy()
    return float(np.abs(onnx_out - torch_out).max())


def torch_forward(net, precision):
    """forward(x, t, labels) of the torch twin, in fp32 or under bf16 autocast (the way a torch user speeds it up)."""
    import torch

    def forward(x, t, labels):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return net(x, t, labels).float()

    return forward


def backend_forward(sampler):
    """forward(x, t, labels) through a ddengine backend with torch tensors in and out (optimum-intel's OVModel)."""
    import torch

    timestep_dtype = sampler.spec.io["timestep"].dtype  # a sigma-space scheduler's timesteps are float tensors

    def forward(x, t, labels):
        feeds = {"sample": x.numpy(), "timestep": t.numpy().astype(timestep_dtype)}
        if labels is not None:
            feeds["class_labels"] = labels.numpy()
        out = np.empty(x.shape, dtype=np.float32)
        return torch.from_numpy(sampler.backend.run(feeds, out))

    return forward


def diffusers_runner(forward, sampler, request):
    """The diffusers way: the method's scheduler class (engine/core/solvers/classes.py) in a torch loop around
    `forward`, CFG by torch ops, init_noise_sigma and scale_model_input as its pipelines apply them."""
    import diffusers
    import torch

    from ddengine.core.solvers.classes import METHOD_CLASSES

    spec, b = sampler.spec, request.n
    config = dict(spec.scheduler)
    if request.spacing is not None:
        config["timestep_spacing"] = request.spacing
    name, keys = METHOD_CLASSES[request.method]
    scheduler = getattr(diffusers, name).from_config(config, **keys)
    feeds, _, guided = forward_feeds(sampler, request)
    labels = torch.from_numpy(feeds["class_labels"]) if "class_labels" in feeds else None
    extra = {"eta": request.eta} if request.method == "ddim" else {}

    def once():
        generator, fwd, stp = torch.Generator().manual_seed(0), 0.0, 0.0
        start = time.perf_counter()
        scheduler.set_timesteps(request.steps)
        x = torch.randn((b, *spec.image_shape), generator=generator) * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                t0 = time.perf_counter()
                x_in = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
                out = forward(x_in, t.expand(len(x_in)), labels)
                if guided:
                    cond, uncond = out.chunk(2)
                    out = uncond + request.guidance * (cond - uncond)
                t1 = time.perf_counter()
                x = scheduler.step(out, t, x, generator=generator, **extra).prev_sample
                fwd, stp = fwd + t1 - t0, stp + time.perf_counter() - t1
        return {"seconds": time.perf_counter() - start, "forward": fwd, "step": stp}

    return once


def bench_request(sampler, batch, steps, method, eta, guidance, spacing):
    """The validated Request a benchmark row samples: `batch` images, every class in turn on a conditional model."""
    classes = "all" if sampler.spec.conditional else None
    return sampler.request(
        batch,
        steps=steps,
        method=method,
        eta=eta,
        classes=classes,
        guidance=guidance,
        spacing=spacing,
        batch_size=batch,
    )


def run_benchmarks(
    samplers,
    batches,
    steps=50,
    method="ddim",
    eta=0.0,
    guidance=None,
    repeats=3,
    baselines=True,
    log=None,
    torch_weights=None,
    spacing=None,
):
    """Every configuration for every batch size, round-robin per batch.

    samplers: backend label -> Sampler (the engine and its floor are measured on each); the baselines use the
    ONNX Runtime sampler (numpy step), the torch twin (fp32, bf16) and an OpenVINO sampler when given.
    """
    first = next(iter(samplers.values()))
    net, why = torch_twin(first, torch_weights) if baselines else (None, "")
    rows = []
    for batch in batches:
        requests = {k: bench_request(s, batch, steps, method, eta, guidance, spacing) for k, s in samplers.items()}
        runners, labels = {}, {}
        for key, sampler in samplers.items():
            for name, factory in ((engine_name(key), engine_runner), (floor_name(key), floor_runner)):
                runners[name] = factory(sampler, requests[key])
                labels[name] = {"backend": sampler.backend.name, "precision": sampler.backend.precision}
        if baselines:
            ort = next((s for s in samplers.values() if s.backend.name == "ort-cpu"), first)
            runners[NUMPY] = numpy_runner(ort, requests[_key(samplers, ort)])
            labels[NUMPY] = {"backend": ort.backend.name, "precision": "fp32"}
            if net is not None:
                for precision in ("fp32", "bf16"):
                    runners[diffusers_name(precision)] = diffusers_runner(
                        torch_forward(net, precision), first, requests[_key(samplers, first)]
                    )
                    labels[diffusers_name(precision)] = {"backend": "torch", "precision": precision}
            ov = next((s for s in samplers.values() if s.backend.name == "openvino"), None)
            if ov is not None and _has("torch") and _has("diffusers"):
                runners[OPENVINO_DIFFUSERS] = diffusers_runner(backend_forward(ov), ov, requests[_key(samplers, ov)])
                labels[OPENVINO_DIFFUSERS] = {"backend": "openvino", "precision": ov.backend.precision}
        request = requests[_key(samplers, first)]
        runs = measure(runners, repeats)
        measured = [to_row(name, request, runs[name], **labels[name]) for name in runners]
        if baselines and net is None:
            measured += [
                Row(diffusers_name(p), batch, steps, backend="torch", precision=p, note=why) for p in ("fp32", "bf16")
            ]
        for row in measured:
            if log is not None:
                log(row)
            rows.append(row)
    return rows


def _key(samplers, sampler):
    return next(k for k, s in samplers.items() if s is sampler)


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def summary(rows, samplers):
    """Per batch and backend: engine / its floor and the engine's speed-up over each torch baseline (None: not measured)."""
    out = {}
    for batch in sorted({r.batch for r in rows}):
        by_name = {r.name: r for r in rows if r.batch == batch and r.seconds is not None}
        entry = {}
        for key in samplers:
            engine, floor = by_name.get(engine_name(key)), by_name.get(floor_name(key))
            if engine is None or floor is None:
                continue
            stats = {
                "over_floor": engine.seconds / floor.seconds,
                "over_floor_best": min(engine.runs) / min(floor.runs),
            }
            for base in (diffusers_name("fp32"), diffusers_name("bf16"), OPENVINO_DIFFUSERS):
                if base in by_name:
                    stats[f"speedup_vs {base}"] = by_name[base].seconds / engine.seconds
            entry[key] = stats
        out[str(batch)] = entry
    return out


def machine():
    """What the numbers were measured on: CPU model, its ISA flags, cores, package versions (read from their
    metadata: nothing is imported) and the load."""
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == (platform.processor() or platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for package in ("onnxruntime", "onnxruntime-gpu", "numpy", "openvino", "torch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "isa_flags": [f for f in ISA_FLAGS if f in flags],
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        **versions,
        "load_average_1_5_15min": load_average(),
    }


def load_average():
    """The 1/5/15-minute load averages: other work on the machine while measuring (None where unknown)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
