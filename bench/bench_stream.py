"""Streaming overhead: saturated images/s of POST /v1/images/generations with stream + partial_images=K against
the same requests unstreamed, on one server, in alternating rounds.

    python bench/bench_stream.py [--rounds 4] [--seconds 20] [--partial-images 2] [--backend auto]

One `ddengine serve`-equivalent server (bench/bench_serve.py's, the default Fifo StepBatcher) takes a closed loop
of mixed requests (n 1..4, steps 20/50, ddim/unipc, a class name each): round r runs the unstreamed then the
streamed loop (the order flips every round, so drift cancels). A streamed request counts when its
`image_generation.completed` events have all arrived. Writes bench/results/stream_<cpu>-<cores>c_<backend>.json
with each round, the medians, their ratio (target: streamed >= 0.95x unstreamed at K = 2) and the machine.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import RESULTS, Server, client, cpu_slug, machine, write_json  # noqa: E402

STEPS, METHODS, N = (20, 50), ("ddim", "unipc"), (1, 4)


def bodies(count, seed, names, stream, partial_images):
    """`count` OpenAI request bodies, the same seeded list for both variants but for the stream fields."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        body = {
            "prompt": str(rng.choice(names)),
            "n": int(rng.integers(N[0], N[1] + 1)),
            "steps": int(rng.choice(STEPS)),
            "method": str(rng.choice(METHODS)),
            "seed": int(rng.integers(0, 2**32)),
            "response_format": "b64_json",
        }
        if stream:
            body |= {"stream": True, "partial_images": partial_images}
        out.append(body)
    return out


async def generate(http, body):
    """(images delivered, finished at): the whole response read, SSE or JSON."""
    if not body.get("stream"):
        response = await http.post("/v1/images/generations", json=body)
        return (len(response.json()["data"]) if response.status_code == 200 else 0), time.perf_counter()
    completed = 0
    async with http.stream("POST", "/v1/images/generations", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:") and '"image_generation.completed"' in line:
                completed += 1
    return completed, time.perf_counter()


async def closed_loop(url, requests, concurrency, seconds):
    """Images/s of the requests finishing in the window's last two thirds, `concurrency` in flight."""
    results, start, cursor = [], time.perf_counter(), iter(requests)

    async def lane(http):
        while time.perf_counter() - start < seconds:
            body = next(cursor, None)
            if body is None:
                return
            results.append(await generate(http, body))

    async with client(url) as http:
        await asyncio.gather(*(lane(http) for _ in range(concurrency)))
    done = [images for images, end in results if seconds / 3 <= end - start <= seconds]
    return sum(done) / (seconds * 2 / 3)


def benchmark(args):
    server = Server("step", args)
    try:
        names = server.health.get("class_names") or class_names(args)
        info = machine(server, args)
        concurrency = args.max_batch  # mean n 2.5: ~40 images wanted for 16 slots, saturated
        plain = bodies(5000, 1, names, False, 0)
        streamed = bodies(5000, 1, names, True, args.partial_images)
        asyncio.run(closed_loop(server.url, plain, concurrency, args.warmup))
        rounds = []
        for r in range(args.rounds):
            order = ("plain", "streamed") if r % 2 == 0 else ("streamed", "plain")
            row = {}
            for variant in order:
                requests = plain if variant == "plain" else streamed
                row[variant] = round(asyncio.run(closed_loop(server.url, requests, concurrency, args.seconds)), 3)
            rounds.append(row)
            print(f"round {r}: plain {row['plain']:.2f} img/s, streamed {row['streamed']:.2f} img/s", flush=True)
    finally:
        server.stop()
    medians = {v: statistics.median(row[v] for row in rounds) for v in ("plain", "streamed")}
    ratio = medians["streamed"] / medians["plain"]
    info["load_average_after"] = list(np.round(os.getloadavg(), 2))
    return {
        "benchmark": f"streaming overhead: stream + partial_images={args.partial_images} vs unstreamed, saturated",
        "machine": info,
        "config": {
            "rounds": args.rounds,
            "seconds_per_run": args.seconds,
            "concurrency": concurrency,
            "max_batch": args.max_batch,
            "workload": {"n": list(N), "steps": list(STEPS), "methods": list(METHODS)},
            "partial_images": args.partial_images,
        },
        "rounds": rounds,
        "median_images_per_s": medians,
        "streamed_over_plain": round(ratio, 4),
        "target_streamed_ge_0.95x": ratio >= 0.95,
    }


def class_names(args):
    from ddengine.model.load import load_model

    return list(load_model(args.model).spec.class_names)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="ONNX model with class names (default: the shipped one)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--partial-images", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=20.0, help="closed-loop seconds per variant and round")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--note", default="", help="recorded as is, e.g. what else ran on the machine")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def main():
    args = parse_args()
    out = benchmark(args)
    name = f"stream_{cpu_slug(out['machine']['cpu'])}-{os.cpu_count()}c_{out['machine']['backend']}.json"
    write_json(args.out or RESULTS / name, out)
    print(json.dumps({k: out[k] for k in ("median_images_per_s", "streamed_over_plain")}, indent=1))


if __name__ == "__main__":
    main()
