"""Benchmark of the fused step (ddengine.kernels._step.step, noise included) against numpy, diffusers and a copy floor.

    python bench/bench_step.py [--threads N] [--sizes 10000,100000,1000000,10000000] [--seconds 0.3]

Prints ns/element, GB/s (12 bytes per element: read x and model_out, write x) and ratios, then one line per solver
row against DDIM's: the middle row of its 20-step plan on the shipped schedule ("history": a multistep row reads its
history slots there) and, for a multistep solver, its first row ("first": no slot read yet), timed in interleaved
repetitions (medians) so that a shared machine's load falls on all alike, and writes
bench/results/step_<cpu>-<cores>c-t<threads>.json (CPU model, ISA flags, load; no hostnames or paths). torch is
imported here only.
"""

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from ddengine.core.plan import METHODS, make_plan
from ddengine.core.reference import reference_step
from ddengine.core.rows import CLIP as CLIP_COLUMN
from ddengine.core.rows import NUM_COLUMNS, SLOTS, WRITE_D, is_multistep
from ddengine.kernels import _step
from ddengine.kernels.host import image_records, row_shape

CLIP = 1.0  # all three clip x0 to [-1, 1], as DDPMScheduler's default clip_sample=True
# A contractive DDPM-like row (engine/core/rows.py order) with sigma != 0, so repeated in-place steps stay bounded.
ROW = np.zeros((1, NUM_COLUMNS), np.float32)
ROW[0, :9] = [1.02, -0.2, 0.0, 1.0, 0.0, 0.1, 0.85, 0.05, 0.1]
ROW[0, CLIP_COLUMN], ROW[0, WRITE_D] = CLIP, -1.0
STEP_BYTES = 12  # per element: read x, read model_out, write x (float32)


def median_seconds(fn, budget):
    """Median wall time of fn() over max(5, what fits in `budget` seconds) runs, after one warm-up."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    times = []
    for _ in range(max(5, min(1000, int(budget / once)))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fused(n, threads, table=ROW):
    x, m, images = np.zeros((1, n), np.float32), np.ones((1, n), np.float32), image_records([1])
    slots = np.zeros((1, SLOTS, n), np.float32)
    return lambda: _step.step(x, m, table, images, slots=slots, threads=threads)


def numpy_unfused(n):
    rng = np.random.default_rng(0)
    x, m = np.zeros((1, n), np.float32), np.ones((1, n), np.float32)
    return lambda: reference_step(x, m, ROW[0], rng.standard_normal(x.shape, dtype=np.float32), dtype=np.float32)


def solver_cases():
    """(method, row, table of that one row): every method's middle row, and a multistep method's first row too."""
    config = {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}
    for method in METHODS:
        table = make_plan(config, 20, method=method).rows_float32()
        yield method, "history", np.ascontiguousarray(table[len(table) // 2 : len(table) // 2 + 1])
        if is_multistep(table[0]):
            yield method, "first", np.ascontiguousarray(table[:1])


def interleaved_medians(fns, budget, reps):
    """Median seconds per call of each fn, timed in `reps` rounds that visit every fn in turn (a warm-up call before
    each sample), so that load changes on a shared machine fall on all alike; a sample lasts about budget / reps."""
    calls = {}
    for key, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[key] = max(1, int(budget / reps / max(time.perf_counter() - start, 1e-7)))
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            fn()
            start = time.perf_counter()
            for _ in range(calls[key]):
                fn()
            times[key].append((time.perf_counter() - start) / calls[key])
    return {key: statistics.median(v) for key, v in times.items()}


def solver_rows(n, threads, budget, reps=15):
    """ns/element of each method's middle row (and a multistep method's first), and its ratio to DDIM's middle row.
    Inputs start at zeros (x = model_out = slots = 0), which a noiseless row keeps at zero: repeated steps stay finite."""
    cases = {(method, row): table for method, row, table in solver_cases()}
    x, m, images = np.zeros((1, n), np.float32), np.zeros((1, n), np.float32), image_records([1])
    slots = np.zeros((1, SLOTS, n), np.float32)
    fns = {key: partial(_step.step, x, m, table, images, slots=slots, threads=threads) for key, table in cases.items()}
    ns = {key: s / n * 1e9 for key, s in interleaved_medians(fns, budget, reps).items()}
    base = ns[("ddim", "history")]
    rows = []
    for (method, row), v in ns.items():
        shape = row_shape(cases[(method, row)][0])
        rows.append({"method": method, "row": row, "ns_per_element": v, "over_ddim": v / base, "shape": shape})
        print(f"{method:>9} {row:>7} | {v:7.3f} ns/el | {v / base:5.2f}x DDIM", flush=True)
    return rows


def diffusers_step(n):
    import torch
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=True, clip_sample_range=CLIP)
    scheduler.set_timesteps(50)
    t = scheduler.timesteps[10]
    x, m = torch.zeros((1, n), dtype=torch.float32), torch.ones((1, n), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    return lambda: scheduler.step(m, t, x, generator=generator).prev_sample


def copy_floor(n):
    x, m = np.zeros((1, n), np.float32), np.ones((1, n), np.float32)
    dx, dm = np.empty_like(x), np.empty_like(m)
    return lambda: (np.copyto(dx, x), np.copyto(dm, m))


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "amx_tile",
    "neon",
    "asimd",
)


def isa_flags():
    """The SIMD flags of /proc/cpuinfo that pick the kernel's ISA clone (x86-64-v4: avx512f/bw/vl; v3: avx2/fma)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return []
    have = set(line.split(":", 1)[-1].split())
    return [flag for flag in ISA_FLAGS if flag in have]


def machine(threads):
    import diffusers
    import torch

    return {
        "cpu": cpu_model() or platform.machine(),
        "isa_flags": isa_flags(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "loadavg_before": os.getloadavg(),
    }


def run(sizes, threads, budget):
    """One row per size: median seconds of each contender and the derived ratios."""
    rows = []
    for n in sizes:
        t = {
            "fused": median_seconds(fused(n, threads), budget),
            "numpy": median_seconds(numpy_unfused(n), budget),
            "diffusers": median_seconds(diffusers_step(n), budget),
            "copy": median_seconds(copy_floor(n), budget),
        }
        rows.append(
            {
                "elements": n,
                "seconds": t,
                "ns_per_element": {k: v / n * 1e9 for k, v in t.items()},
                "fused_gb_s": STEP_BYTES * n / t["fused"] / 1e9,
                "speedup_vs_numpy": t["numpy"] / t["fused"],
                "speedup_vs_diffusers": t["diffusers"] / t["fused"],
                "fused_over_copy": t["fused"] / t["copy"],
            }
        )
        print(table_line(rows[-1]), flush=True)
    return rows


def table_line(r):
    ns = r["ns_per_element"]
    return (
        f"{r['elements']:>9} | {ns['fused']:7.3f} {r['fused_gb_s']:6.2f} | {ns['numpy']:7.3f} "
        f"{ns['diffusers']:8.3f} {ns['copy']:6.3f} | {r['speedup_vs_numpy']:6.1f}x "
        f"{r['speedup_vs_diffusers']:7.1f}x {r['fused_over_copy']:6.2f}"
    )


HEADER = "elements  | fused ns/el  GB/s | numpy  diffusers  copy (ns/el) | vs numpy vs diffusers fused/copy"


def write_json(path, payload):
    """Atomic write: temp file in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="threads of the fused step and torch (0 = all cores)")
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000", help="comma-separated element counts")
    parser.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds of the solver rows (medians)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/step_<id>.json)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads or os.cpu_count())
    info = machine(args.threads)
    print(
        f"{info['cpu']} ({' '.join(info['isa_flags'])}), {info['cores']} cores, threads={args.threads}, "
        f"load {info['loadavg_before']}"
    )
    print(HEADER)
    rows = run([int(s) for s in args.sizes.split(",")], args.threads, args.seconds)
    solvers = solver_rows(1_000_000, args.threads, args.seconds, args.reps)
    info["loadavg_after"] = os.getloadavg()
    slug = re.sub(r"[^a-z0-9]+", "-", info["cpu"].lower()).strip("-")
    out = args.out or Path(__file__).resolve().parent / "results" / f"step_{slug}-{info['cores']}c-t{args.threads}.json"
    write_json(
        out,
        {
            "benchmark": "fused step vs numpy / diffusers DDPMScheduler.step / copy floor",
            "step": {"row": [round(float(v), 6) for v in ROW[0]], "clip": CLIP, "noise": True},
            "bytes_per_element": STEP_BYTES,
            "machine": info,
            "results": rows,
            "solvers_at_1e6_elements": solvers,
        },
    )
    print(f"wrote {out.name}")


if __name__ == "__main__":
    main()
