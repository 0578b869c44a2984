"""What the StepBatcher's separate output stage buys a text-to-image server: saturated images/s with the output
stage on its own thread (the default) against inline on the worker (`inline_output=True`), alternating rounds.

    python bench/bench_output_stage.py [--size 64] [--rounds 4] [--seconds 30] [--backend auto]

Builds the tests' tiny random StableDiffusionPipeline (tests/support/tiny_pipeline.py), exports it at --size
pixels (the VAE decode grows with the image; the tiny U-Net with the latents), then keeps `--concurrency`
prompt requests (n 1..4, unipc 10/20 steps) in flight on one in-process batcher per variant. Writes
bench/results/output_stage_<cpu>-<cores>c.json with the rounds, medians, their ratio and the machine. Needs the
export extra (torch, diffusers, transformers) to build the folder.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support.tiny_pipeline

from bench_serve import RESULTS, cpu_slug, write_json  # noqa: E402

from ddengine.benchmark.harness import machine  # noqa: E402

PROMPTS = ("a photo of a cat", "a red shoe", "a bag on a table", "a sneaker")


def build_model(folder, size):
    """The tiny pipeline exported at size x size (the CLI's own export)."""
    from click.testing import CliRunner

    from ddengine.cli import main
    from tests.support.tiny_pipeline import build_tiny_pipeline

    pipeline = build_tiny_pipeline(folder / "pipeline")
    out = folder / "model"
    args = ["export", "--diffusers", str(pipeline), "-o", str(out), "--height", str(size), "--width", str(size)]
    result = CliRunner().invoke(main, args)
    if result.exit_code:
        raise SystemExit(result.output)
    return out


def requests(sampler, count, seed):
    rng = np.random.default_rng(seed)
    return [
        sampler.request(
            int(rng.integers(1, 5)),
            steps=int(rng.choice([10, 20])),
            method="unipc",
            prompt=str(rng.choice(PROMPTS)),
            seed=int(rng.integers(0, 2**32)),
        )
        for _ in range(count)
    ]


def saturated(batcher, work, concurrency, seconds):
    """Images/s of the requests finishing in the window's last two thirds, `concurrency` in flight."""
    done, start, cursor, lock = [], time.perf_counter(), iter(work), threading.Lock()

    def lane():
        while time.perf_counter() - start < seconds:
            with lock:
                request = next(cursor, None)
            if request is None:
                return
            images = batcher.submit(request).result().images
            done.append((len(images), time.perf_counter() - start))

    lanes = [threading.Thread(target=lane) for _ in range(concurrency)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    return sum(k for k, end in done if seconds / 3 <= end <= seconds) / (seconds * 2 / 3)


def benchmark(args):
    from ddengine.runtime.sampler import Sampler
    from ddengine.serving.batcher import StepBatcher

    with tempfile.TemporaryDirectory() as tmp:
        sampler = Sampler(build_model(Path(tmp), args.size), backend=args.backend, threads=args.threads)
        work = requests(sampler, 20000, 1)
        batchers = {
            "thread": StepBatcher(sampler.parts, max_batch=args.max_batch),
            "inline": StepBatcher(sampler.parts, max_batch=args.max_batch, inline_output=True),
        }
        for batcher in batchers.values():
            saturated(batcher, work, args.concurrency, args.warmup)
        rounds = []
        for r in range(args.rounds):
            order = ("inline", "thread") if r % 2 == 0 else ("thread", "inline")
            row = {v: round(saturated(batchers[v], work, args.concurrency, args.seconds), 3) for v in order}
            rounds.append(row)
            print(f"round {r}: inline {row['inline']:.2f} img/s, own thread {row['thread']:.2f} img/s", flush=True)
        for batcher in batchers.values():
            batcher.close()
        backend, precision = sampler.backend.name, sampler.backend.precision
    medians = {v: statistics.median(row[v] for row in rounds) for v in ("inline", "thread")}
    info = machine()
    info["load_average_after"] = list(np.round(os.getloadavg(), 2))
    return {
        "benchmark": "text-to-image: the batcher's output stage on its own thread vs inline on the worker, saturated",
        "machine": info,
        "config": {
            "model": f"tests' tiny StableDiffusionPipeline exported at {args.size}x{args.size}",
            "backend": backend,
            "precision": precision,
            "max_batch": args.max_batch,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "seconds_per_run": args.seconds,
            "workload": {"n": [1, 4], "steps": [10, 20], "method": "unipc", "prompts": list(PROMPTS)},
        },
        "rounds": rounds,
        "median_images_per_s": medians,
        "thread_over_inline": round(medians["thread"] / medians["inline"], 4),
    }


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="image pixels per side (a multiple of 8)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def main():
    args = parse_args()
    out = benchmark(args)
    write_json(args.out or RESULTS / f"output_stage_{cpu_slug(out['machine']['cpu'])}-{os.cpu_count()}c.json", out)
    print(json.dumps({k: out[k] for k in ("median_images_per_s", "thread_over_inline")}, indent=1))


if __name__ == "__main__":
    main()
