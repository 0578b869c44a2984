"""GPU benchmark: torch eager U-Net + diffusers' DDIM step (fp32, fp16) vs the same U-Net + our fused CUDA step,
without and with one CUDA graph per denoising step. Needs an NVIDIA GPU, torch with CUDA and cuda-python.

    python bench/bench_gpu.py [--batches 1,16,64] [--steps 50] [--repeats 5] [--unet-config cfg.json]

Times whole `steps`-step denoising loops with CUDA events (median of --repeats after a warm-up) and the
scheduler step alone, per batch size, and writes bench/results/gpu_<card>.json (card name, versions, numbers;
no hostnames or paths). The U-Net has random weights: only its cost matters here. torch is imported in main().
"""
import argparse
import json
import platform
import re
import statistics
import sys
from pathlib import Path

import numpy as np

SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
             "prediction_type": "epsilon", "clip_sample": True, "clip_sample_range": 1.0,
             "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False}
RESULTS = Path(__file__).parent / "results"
EXIT_NO_GPU = 2


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes (images)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5, help="timed loops per variant (median reported)")
    p.add_argument("--unet-config", default=None, help="UNetConfig JSON (default: export/unet.py's defaults)")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON result")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if min(args.batches) < 1 or args.steps < 1 or args.repeats < 1:
        p.error(f"batches, steps and repeats must be >= 1, got {args.batches}, {args.steps}, {args.repeats}")
    return args


def require_gpu():
    """Exit with a clear message (code 2) unless a CUDA GPU, torch with CUDA and cuda-python are all here."""
    from ddengine.cuda_step import device_count

    if device_count() == 0:
        fail("bench_gpu.py needs an NVIDIA GPU with its driver and cuda-python (pip install ddengine[gpu]); "
             "none found on this machine")
    import torch

    if not torch.cuda.is_available():
        fail(f"bench_gpu.py needs torch with CUDA; this torch is {torch.__version__} without a usable GPU")
    return torch


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_NO_GPU)


def timed_ms(torch, fn, repeats):
    """Median milliseconds of fn() on the current stream (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class Setup:
    """One batch size: the U-Net (fp32 and fp16 copies), inputs, diffusers' scheduler, our plan on the device."""

    def __init__(self, torch, unet32, batch, steps):
        from ddengine.cuda_step import step_kernels
        from ddengine.plan import make_plan

        self.torch, self.batch, self.steps = torch, batch, steps
        cfg = unet32.config
        self.unet32, self.unet16 = unet32, _half_copy(unet32)
        self.shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        self.labels = torch.arange(batch, device="cuda") % max(cfg.num_classes, 1)
        self.scheduler = diffusers_scheduler(steps)
        plan = make_plan(dict(SCHEDULER), steps, method="ddim", eta=0.0)
        self.kernels = step_kernels(0)
        self.coeffs = torch.from_numpy(plan.rows_float32()).cuda()
        self.t_table = torch.from_numpy(np.asarray(plan.timesteps, np.int64)).cuda()
        self.clip = plan.clip
        self.seeds = torch.from_numpy(np.arange(batch, dtype=np.uint64).view(np.int64)).cuda()
        self.step_index = torch.zeros(1, dtype=torch.int32, device="cuda")
        self.t = torch.zeros(batch, dtype=torch.int64, device="cuda")
        self.x = torch.randn(self.shape, device="cuda")
        self.out = torch.empty(self.shape, device="cuda")
        self.per_image = int(np.prod(self.shape[1:]))

    def diffusers_loop(self, half):
        """Eager U-Net + DDIMScheduler.step (torch ops), as a diffusers pipeline runs it."""
        torch, unet = self.torch, self.unet16 if half else self.unet32
        x = self.x.clone()
        with torch.no_grad():
            for t in self.scheduler.timesteps:
                t_batch = torch.full((self.batch,), int(t), device="cuda")
                m = unet(x.half() if half else x, t_batch, self.labels).float()
                x = self.scheduler.step(m, t, x).prev_sample
        return x

    def fused_step(self):
        """set_timesteps + U-Net (fp16) + fused step + advance: the launches one CUDA graph captures."""
        torch, k = self.torch, self.kernels
        stream = torch.cuda.current_stream().cuda_stream
        k.set_timesteps(stream, self.t.data_ptr(), self.t_table.data_ptr(), self.step_index.data_ptr(), self.batch, "int64")
        with torch.no_grad():
            self.out.copy_(self.unet16(self.x.half(), self.t, self.labels))
        k.step(stream, self.x.data_ptr(), self.out.data_ptr(), self.coeffs.data_ptr(), self.step_index.data_ptr(),
               self.seeds.data_ptr(), self.batch, self.per_image, None, self.clip)
        k.advance(stream, self.step_index.data_ptr())

    def fused_loop(self):
        self.step_index.zero_()
        for _ in range(self.steps):
            self.fused_step()

    def graph(self):
        """One CUDA graph of fused_step (torch's capture; our launches go on its capture stream)."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.step_index.zero_()
            self.fused_step()  # warm-up on the side stream, as torch.cuda.graphs recommends
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.fused_step()
        return graph

    def graph_loop(self, graph):
        self.step_index.zero_()
        for _ in range(self.steps):
            graph.replay()

    def step_only(self):
        """(diffusers DDIM step ms or None, fused kernel ms) on this batch, with the model output fixed."""
        torch, k = self.torch, self.kernels
        self.step_index.fill_(self.steps // 2)  # a valid row; the loops above left it at `steps`
        stream = torch.cuda.current_stream().cuda_stream
        ours = lambda: k.step(stream, self.x.data_ptr(), self.out.data_ptr(), self.coeffs.data_ptr(),  # noqa: E731
                              self.step_index.data_ptr(), self.seeds.data_ptr(), self.batch, self.per_image, None, self.clip)
        if self.scheduler is None:
            return None, timed_ms(torch, ours, 50)
        t = self.scheduler.timesteps[self.steps // 2]
        theirs = lambda: self.scheduler.step(self.out, t, self.x)  # noqa: E731
        return timed_ms(torch, theirs, 50), timed_ms(torch, ours, 50)


def diffusers_scheduler(steps):
    """diffusers' DDIMScheduler set to `steps`, or None when diffusers is not installed (its rows are skipped)."""
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        print("diffusers is not installed: the diffusers baselines are skipped", file=sys.stderr)
        return None
    scheduler = DDIMScheduler(**SCHEDULER)
    scheduler.set_timesteps(steps)
    return scheduler


def _half_copy(module):
    import copy

    return copy.deepcopy(module).half()


def run_batch(torch, unet32, batch, steps, repeats):
    s = Setup(torch, unet32, batch, steps)
    loops = {"torch_fp16_fused_step": s.fused_loop}
    if s.scheduler is not None:
        loops = {"torch_fp32_diffusers_step": lambda: s.diffusers_loop(False),
                 "torch_fp16_diffusers_step": lambda: s.diffusers_loop(True), **loops}
    result = {name: timed_ms(torch, fn, repeats) for name, fn in loops.items()}
    graph = s.graph()
    result["torch_fp16_fused_step_cuda_graph"] = timed_ms(torch, lambda: s.graph_loop(graph), repeats)
    step_diffusers, step_fused = s.step_only()
    row = {"batch": batch, "loop_ms": result,
           "ms_per_step": {k: v / steps for k, v in result.items()},
           "images_per_s": {k: batch * 1000.0 / v for k, v in result.items()},
           "step_only_ms": {"diffusers_ddim_step": step_diffusers, "fused_cuda_step": step_fused}}
    return row


def environment(torch):
    from ddengine.cuda_step import gpu_properties, nvrtc_version

    name, capability = gpu_properties(0)
    return {"gpu": name, "compute_capability": capability, "torch": torch.__version__, "cuda": torch.version.cuda,
            "nvrtc": ".".join(map(str, nvrtc_version())), "python": platform.python_version()}


def main(argv=None):
    args = parse_args(argv)
    torch = require_gpu()
    from ddengine.nets.unet import UNet, UNetConfig
    from ddengine.output import atomic_write

    config = UNetConfig.from_dict(json.loads(Path(args.unet_config).read_text())) if args.unet_config else UNetConfig()
    torch.manual_seed(0)
    unet32 = UNet(config).cuda().eval()
    env = environment(torch)
    rows = []
    for batch in args.batches:
        rows.append(run_batch(torch, unet32, batch, args.steps, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    record = {"benchmark": "bench_gpu", "environment": env, "steps": args.steps, "repeats": args.repeats,
              "unet_config": json.loads(config.to_json()), "scheduler": SCHEDULER, "results": rows,
              "notes": "median of CUDA-event times; U-Net random weights; guidance off; DDIM eta=0"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_{re.sub(r'[^A-Za-z0-9]+', '-', env['gpu']).strip('-').lower()}.json"
    atomic_write(path, (json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
