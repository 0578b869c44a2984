"""GPU benchmark of the product's own device loop (engine/runtime/device_loop.py) with the torch-CUDA backend, against the
diffusers way (the torch fp16 twin in eager mode + diffusers' DDIMScheduler, all on the GPU) and the floor (the
bare U-Net forward, graph-captured, times the steps).

    python bench/bench_gpu.py [--model M.onnx] [--batches 1,16,64,256] [--steps 50] [--repeats 5] [--out DIR]

Per batch and with / without classifier-free guidance: wall time of one whole request (noise, every step, the
download) through DeviceLoop with graphs=False and graphs=True, the diffusers loop, and the floor; median of
--repeats after a warm-up, CUDA-synchronized. Writes DIR/gpu_<card>.json (card, versions, numbers; no host
names or paths) and prints a table. `--dry-run` builds every configuration on the CPU and times nothing.
"""

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
EXIT_NO_GPU = 2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="ONNX model with its torch twin next to it (default: the shipped one)")
    p.add_argument("--batches", default="1,16,64,256", help="comma-separated batch sizes (images)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median reported)")
    p.add_argument("--guidance", type=float, default=1.5, help="the scale of the guided rows")
    p.add_argument("--precision", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON result")
    p.add_argument("--dry-run", action="store_true", help="build every configuration without a GPU; time nothing")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if min(args.batches) < 1 or args.steps < 1 or args.repeats < 1:
        p.error(f"batches, steps and repeats must be >= 1, got {args.batches}, {args.steps}, {args.repeats}")
    return args


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_NO_GPU)


def require_gpu():
    """torch with a CUDA GPU and cuda-python, or exit 2 with a clear message."""
    from ddengine.gpu.driver import device_count

    if device_count() == 0:
        fail("bench_gpu.py needs an NVIDIA GPU with its driver and cuda-python (pip install ddengine[gpu]); none found")
    import torch

    if not torch.cuda.is_available():
        fail(f"bench_gpu.py needs torch with CUDA; this torch is {torch.__version__} without a usable GPU")
    return torch


def timed(torch, fn, repeats):
    """Median seconds of fn() (CUDA-synchronized), after one warm-up call; and every run."""
    fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), runs


class Case:
    """One batch size, guided or not: the request's plan, seeds, classes and the runners that time it."""

    def __init__(self, backend, batch, steps, guidance, device_loops):
        from ddengine.runtime.conditioning import class_conditioning
        from ddengine.runtime.params import SamplingParams
        from ddengine.runtime.parts import step_plan

        spec = backend.spec
        self.backend, self.batch, self.guidance = backend, batch, guidance
        classes = "all" if spec.conditional else None
        params = SamplingParams.build(n=batch, steps=steps, classes=classes, guidance=guidance)
        self.request = params.bind(spec, batch_size=batch)
        self.plan = step_plan(spec, self.request)
        self.seeds, self.classes = self.request.seeds, self.request.classes
        self.conditioning = class_conditioning(spec, self.classes, self.request.guidance, batch)
        self.loops = device_loops

    def engine(self, graphs):
        loop = self.loops[graphs]
        return lambda: loop.denoise(self.plan, self.seeds, self.conditioning)


def diffusers_runner(torch, backend, case):
    """The diffusers way on the GPU: the fp16 twin eager, DDIMScheduler.step on torch tensors, CFG by torch ops."""
    from diffusers import DDIMScheduler

    spec = backend.spec
    scheduler = DDIMScheduler.from_config(dict(spec.scheduler))
    guided = case.conditioning.guided
    device = f"cuda:{backend.device}"
    labels = None
    if "class_labels" in case.conditioning.inputs:
        own, null = case.conditioning.inputs["class_labels"]
        labels = torch.from_numpy(np.concatenate([own, null]) if guided else own).to(device)
    shape = (case.batch, *spec.image_shape)

    def run():
        generator = torch.Generator(device=device).manual_seed(0)
        scheduler.set_timesteps(case.request.steps)
        x = torch.randn(shape, generator=generator, device=device)
        with torch.inference_mode():
            for t in scheduler.timesteps:
                x_in = torch.cat([x, x]) if guided else x
                out = backend.net(x_in.to(backend.dtype), t.to(device).expand(len(x_in)), labels).float()
                if guided:
                    cond, uncond = out.chunk(2)
                    out = uncond + case.guidance * (cond - uncond)
                x = scheduler.step(out, t, x).prev_sample
        return x

    return run


def floor_runner(torch, backend, case):
    """The floor: the bare forward of the engine's rows, captured in one CUDA graph, replayed `steps` times."""
    from ddengine.core.guidance import forward_rows

    spec, device = backend.spec, f"cuda:{backend.device}"
    rows = forward_rows(case.batch, case.conditioning.guided)
    x = torch.randn((rows, *spec.image_shape), device=device)
    t = torch.full((rows,), 500, dtype=torch.int64, device=device)
    c = torch.zeros(rows, dtype=torch.int64, device=device) if spec.conditional else None
    out = torch.empty_like(x)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out.copy_(backend.forward(x, t, c))  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out.copy_(backend.forward(x, t, c))

    def run():
        with torch.cuda.stream(stream):
            for _ in range(case.request.steps):
                graph.replay()

    return run


def environment(torch):
    from ddengine.gpu.driver import gpu_properties
    from ddengine.gpu.nvrtc import nvrtc_version

    name, capability = gpu_properties(0)
    return {
        "gpu": name,
        "compute_capability": capability,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvrtc": ".".join(map(str, nvrtc_version())),
        "python": platform.python_version(),
    }


def table(rows, steps):
    """The results as a Markdown table: ms/step, images/s and the ratios the targets name."""
    lines = [
        "| batch | CFG | diffusers fp16 eager | ddengine eager | ddengine graphs | floor (graph forward) | "
        "graphs vs diffusers | graphs / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = {k: 1e3 * v / steps for k, v in r["seconds"].items()}
        lines.append(
            f"| {r['batch']} | {'on' if r['guided'] else 'off'} | {ms['diffusers']:.3f} ms | {ms['eager']:.3f} ms | "
            f"{ms['graphs']:.3f} ms | {ms['floor']:.3f} ms | {r['seconds']['diffusers'] / r['seconds']['graphs']:.2f}x | "
            f"{r['seconds']['graphs'] / r['seconds']['floor']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    torch = require_gpu()
    from ddengine.backends.torch_cuda import TorchCudaBackend
    from ddengine.files.atomic import atomic_write
    from ddengine.model.load import load_model
    from ddengine.runtime.device_loop import DeviceLoop

    model = load_model(args.model)
    backend = TorchCudaBackend(model, precision=args.precision)
    loops = {False: DeviceLoop(backend, graphs=False), True: DeviceLoop(backend, graphs=True)}
    rows = []
    for batch in args.batches:
        for guidance in (None, args.guidance):
            case = Case(backend, batch, args.steps, guidance, loops)
            runners = {
                "diffusers": diffusers_runner(torch, backend, case),
                "eager": case.engine(False),
                "graphs": case.engine(True),
                "floor": floor_runner(torch, backend, case),
            }
            times = {name: timed(torch, fn, args.repeats) for name, fn in runners.items()}
            rows.append(
                {
                    "batch": batch,
                    "guided": guidance is not None,
                    "guidance": guidance,
                    "seconds": {k: v[0] for k, v in times.items()},
                    "runs": {k: v[1] for k, v in times.items()},
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    env = environment(torch)
    record = {
        "benchmark": "bench_gpu",
        "environment": env,
        "model": model.path.name,
        "model_sha256": model.sha256,
        "precision": args.precision,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": rows,
        "notes": "median wall time of one whole request, CUDA-synchronized; DDIM eta 0",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '-', env['gpu']).strip('-').lower()}.json"
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())
    print(table(rows, args.steps))
    print(f"wrote {path}")


def dry_run(args):
    """Every configuration built without a GPU: the model and its twin load, the plans and the scheduler are made."""
    from diffusers import DDIMScheduler

    from ddengine.model.load import load_model
    from ddengine.nets.twin import load_twin, twin_path
    from ddengine.runtime.params import SamplingParams
    from ddengine.runtime.parts import step_plan

    model = load_model(args.model)
    net = load_twin(twin_path(model.path))
    DDIMScheduler.from_config(dict(model.spec.scheduler))
    for batch in args.batches:
        for guidance in (None, args.guidance):
            classes = "all" if model.spec.conditional else None
            params = SamplingParams.build(n=batch, steps=args.steps, classes=classes, guidance=guidance)
            step_plan(model.spec, params.bind(model.spec, batch_size=batch))
    print(
        f"dry run: {model.path.name} and its torch twin ({sum(p.numel() for p in net.parameters())} parameters) load; "
        f"{len(args.batches) * 2} configurations of {args.steps} steps are valid; nothing timed"
    )


if __name__ == "__main__":
    main()
