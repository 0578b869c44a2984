"""Serving benchmark on loopback: Poisson arrivals at 30%, 70% and 120% of measured capacity, one batcher per policy.

    python bench/bench_serve.py [--window 60] [--loads 0.3,0.7,1.2] [--modes step,request,solo] [--backend auto]
    python bench/bench_serve.py --modes step,srf,gang     # the StepBatcher's admission policies against each other
    python bench/bench_serve.py --soak-minutes 10        # RSS of the step batcher under ~70% load

Each mode runs the same HTTP server (engine/serving/app.py, a uvicorn subprocess) with the same StepBatcher on the
same kernels (ddengine.runtime.batch.ImageBatch); only its admission policy (engine/serving/policies.py) differs:
(a) "solo", OneAtATime, one request at a time; (b) "request", RequestLevel, request-level dynamic batching as
@serve.batch does it (collect whole requests up to max_batch images for <= 10 ms, run that batch to completion,
admit nothing meanwhile); (c) "step", Fifo, the default (images join and leave at every step); "srf",
ShortestRemainingFirst; "gang", Gang. The mixed workload (n 1..8, steps 10/20/50, ddim/ddpm, guidance on/off) is
the same seeded list for every mode.
Writes bench/results/serve_<cpu>-<cores>c_<backend>[_soak].json: images/s, p50/p99 latency, 503s, server RSS,
the CPU, its ISA flags, the load average and thread counts. Loopback only; bounded in requests and time.
"""

import argparse
import asyncio
import collections
import functools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ddengine.model.load import load_model
from ddengine.serving.batcher import StepBatcher
from ddengine.serving.policies import Fifo, Gang, OneAtATime, RequestLevel, ShortestRemainingFirst

RESULTS = Path(__file__).resolve().parent / "results"
MAX_REQUESTS = 2000  # per run, whatever the rate and window
STEPS, N_RANGE, GUIDANCE = (10, 20, 50), (1, 8), 3.0
MEAN_N = sum(range(N_RANGE[0], N_RANGE[1] + 1)) / (N_RANGE[1] - N_RANGE[0] + 1)


# --- the modes: the StepBatcher with one admission policy each (same queue, kernels, results) -----------------
POLICIES = {
    "solo": OneAtATime(),
    "request": RequestLevel(window=0.010),
    "step": Fifo(),
    "srf": ShortestRemainingFirst(),
    "gang": Gang(),
}
MODES = {mode: functools.partial(StepBatcher, policy=policy) for mode, policy in POLICIES.items()}
LABELS = {
    "solo": "(a) one request at a time",
    "request": "(b) request-level dynamic batching (10 ms window)",
    "step": "(c) StepBatcher (step-level, FIFO)",
    "srf": "(c') StepBatcher, shortest remaining first",
    "gang": "(c'') StepBatcher, gang admission",
}


# --- the server side (a subprocess per mode) --------------------------------------------------------------------
def serve(args):
    """Run engine/serving/app.py's app with MODES[args.serve] as its batcher on 127.0.0.1:args.port."""
    import uvicorn

    from ddengine.runtime.sampler import Sampler
    from ddengine.serving.app import Settings, create_app

    sampler = Sampler(args.model, backend=args.backend, threads=args.threads)
    app = create_app(
        sampler, Settings(max_batch=args.max_batch, max_queue=args.max_queue), batcher_class=MODES[args.serve]
    )
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, log_level="warning", limit_concurrency=4096, timeout_graceful_shutdown=5
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A bench server subprocess for one mode; RSS and thread count read from /proc."""

    def __init__(self, mode, args):
        import httpx

        self.port, self.mode = free_port(), mode
        command = [
            sys.executable,
            __file__,
            "--serve",
            mode,
            "--port",
            str(self.port),
            "--backend",
            args.backend,
            "--max-batch",
            str(args.max_batch),
            "--max-queue",
            str(args.max_queue),
        ]
        command += ["--model", args.model] if args.model else []
        command += ["--threads", str(args.threads)] if args.threads else []
        self.process = subprocess.Popen(command)
        self.num_classes = load_model(args.model).spec.num_classes
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                self.health = httpx.get(f"{self.url}/healthz", timeout=2).json()
                if self.health.get("status") == "ok":
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the {mode} server did not start")

    def proc_status(self, key):
        try:
            with open(f"/proc/{self.process.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
        except (OSError, StopIteration):
            return None

    def cpu_seconds(self):
        """The server process's user + system CPU time so far."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def counters(self):
        """The server's step count and summed step seconds (from /metrics)."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        values = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics", timeout=10).text):
            for sample in family.samples:
                if sample.name in ("ddengine_steps_total", "ddengine_step_seconds_sum"):
                    values[sample.name] = sample.value
        return values

    def rss_mb(self):
        kb = self.proc_status("VmRSS")
        return None if kb is None else round(kb / 1024, 1)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


# --- the client side -------------------------------------------------------------------------------------------
def workload(count, seed, num_classes):
    """`count` mixed request bodies: n 1..8, steps 10/20/50, ddim/ddpm, guidance on/off, a class each."""
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(count):
        body = {
            "n": int(rng.integers(N_RANGE[0], N_RANGE[1] + 1)),
            "steps": int(rng.choice(STEPS)),
            "method": str(rng.choice(["ddim", "ddpm"])),
            "seed": int(rng.integers(0, 2**32)),
        }
        if num_classes:
            body["classes"] = int(rng.integers(num_classes))
            if rng.random() < 0.5:
                body["guidance"] = GUIDANCE
        bodies.append(body)
    return bodies


async def post(http, body):
    """(status, seconds, images, finished at) of one request."""
    start = time.perf_counter()
    try:
        response = await http.post("/v1/images", json=body)
        status = response.status_code
    except Exception as err:  # a transport failure: counted by kind, never retried
        status = f"transport:{type(err).__name__}"
    end = time.perf_counter()
    return status, end - start, body["n"] if status == 200 else 0, end


def client(url):
    import httpx

    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=30), limits=limits)


async def closed_loop(url, bodies, concurrency, seconds):
    """Keep `concurrency` requests in flight for `seconds`: the saturated images/s (the images of the requests
    completing in the last two thirds of the window, over that time)."""
    results, start, cursor = [], time.perf_counter(), iter(bodies)

    async def lane(http):
        while time.perf_counter() - start < seconds:
            body = next(cursor, None)
            if body is None:
                return
            results.append(await post(http, body))

    async with client(url) as http:
        await asyncio.gather(*(lane(http) for _ in range(concurrency)))
    done = [r for r in results if r[0] == 200 and seconds / 3 <= r[3] - start <= seconds]
    return sum(r[2] for r in done) / (seconds * 2 / 3)


async def open_loop(url, bodies, arrivals, drain_limit):
    """Send bodies[i] at arrivals[i] seconds (Poisson); wait <= drain_limit s after the last; returns the results."""
    loop = asyncio.get_running_loop()
    async with client(url) as http:
        start, t0, tasks = loop.time(), time.perf_counter(), []
        for at, body in zip(arrivals, bodies):
            await asyncio.sleep(max(0.0, start + at - loop.time()))
            tasks.append(asyncio.ensure_future(post(http, body)))
        done, pending = await asyncio.wait(tasks, timeout=drain_limit)
        for task in pending:
            task.cancel()  # the client leaves: the server cancels their images
        return [t.result() for t in tasks if t in done], len(pending), t0


def summarize(results, unfinished, t0, window, rss):
    ok = [r for r in results if r[0] == 200]
    latencies = np.array([r[1] for r in ok]) if ok else np.array([np.nan])
    end = max((r[3] for r in ok), default=t0 + window)
    codes = collections.Counter(str(r[0]) for r in results)
    return {
        "sent": len(results) + unfinished,
        "completed": len(ok),
        "rejected_503": codes.get("503", 0),
        "other_errors": {k: v for k, v in codes.items() if k not in ("200", "503")},
        "unfinished": unfinished,
        "images": int(sum(r[2] for r in ok)),
        "images_per_s": round(sum(r[2] for r in ok) / max(end - t0, 1e-9), 3),
        "p50_s": round(float(np.percentile(latencies, 50)), 3),
        "p99_s": round(float(np.percentile(latencies, 99)), 3),
        "max_s": round(float(latencies.max()), 3),
        "rss_mb": rss_summary(rss),
    }


def rss_summary(samples):
    values = [v for _, v in samples if v is not None]
    if not values:
        return None
    return {"start": values[0], "end": values[-1], "max": max(values), "samples": len(values)}


class RssSampler:
    """Samples the server's RSS every `period` seconds in a thread, as (seconds since start, MB)."""

    def __init__(self, server, period=1.0):
        self.server, self.period, self.samples, self._stop = server, period, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((round(time.monotonic() - start, 1), self.server.rss_mb()))
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def poisson(rate, window, seed):
    """Arrival times (s) of a Poisson process of `rate` per second over `window` s (at most MAX_REQUESTS)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=MAX_REQUESTS)
    times = np.cumsum(gaps)
    return times[times < window].tolist()


def measure_capacity(server, args, num_classes):
    """Saturated images/s of this mode (closed loop, enough requests in flight to fill two batches)."""
    concurrency = max(4, int(np.ceil(2 * args.max_batch / MEAN_N)))
    asyncio.run(closed_loop(server.url, workload(concurrency * 2, 999, num_classes), concurrency, args.warmup))
    return asyncio.run(
        closed_loop(server.url, workload(MAX_REQUESTS, 1000, num_classes), concurrency, args.capacity_seconds)
    )


def run_rate(server, load, capacity, args, num_classes):
    """One open-loop run at `load` x capacity (images/s), the same seeded workload for every mode."""
    rate = load * capacity / MEAN_N
    arrivals = poisson(rate, args.window, seed=int(load * 1000))
    bodies = workload(len(arrivals), seed=int(load * 1000) + 1, num_classes=num_classes)
    cpu, before = server.cpu_seconds(), server.counters()
    with RssSampler(server) as rss:
        results, unfinished, t0 = asyncio.run(open_loop(server.url, bodies, arrivals, args.drain))
    after = server.counters()
    steps = after["ddengine_steps_total"] - before["ddengine_steps_total"]
    row = {
        "mode": server.mode,
        "load": load,
        "rate_rps": round(rate, 3),
        "offered_images_per_s": round(rate * MEAN_N, 3),
        **summarize(results, unfinished, t0, args.window, rss.samples),
        "server_cpu_s": round(server.cpu_seconds() - cpu, 1),
        "steps": int(steps),
        "mean_step_s": round(
            (after["ddengine_step_seconds_sum"] - before["ddengine_step_seconds_sum"]) / max(steps, 1), 4
        ),
        "server_threads": server.proc_status("Threads"),
    }
    print(
        f"  {server.mode:8s} {int(load * 100):4d}%  {row['images_per_s']:7.2f} img/s  p50 {row['p50_s']:6.2f} s  "
        f"p99 {row['p99_s']:6.2f} s  503s {row['rejected_503']:4d}  sent {row['sent']:4d}  "
        f"RSS {row['rss_mb']['start'] if row['rss_mb'] else '?'}->{row['rss_mb']['end'] if row['rss_mb'] else '?'} MB",
        flush=True,
    )
    return row


def machine(server, args):
    from ddengine.benchmark.harness import machine as bench_machine

    info = bench_machine()
    info.update(
        backend=server.health["backend"],
        precision=server.health["precision"],
        batch_invariant=server.health["batch_invariant"],
        backend_threads=args.threads or "physical cores",
        server_threads=server.proc_status("Threads"),
        client_threads=threading.active_count(),
        other_processes_note=args.note,
    )
    return info


def cpu_slug(cpu):
    return re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*", "", cpu.lower())).strip("-") or "cpu"


def benchmark(args):
    loads = [float(x) for x in args.loads.split(",")]
    out = {
        "benchmark": "serving: Poisson arrivals at fractions of the step batcher's capacity",
        "modes": {},
        "config": config(args),
        "runs": [],
    }
    capacity = None
    for mode in args.modes.split(","):
        server = Server(mode, args)
        try:
            out.setdefault("machine", machine(server, args))
            measured = measure_capacity(server, args, num_classes(server))
            capacity = capacity or measured  # the first mode's (step) capacity sets every mode's rates
            out["modes"][mode] = {"label": LABELS[mode], "saturated_images_per_s": round(measured, 3)}
            print(f"{LABELS[mode]}: saturated {measured:.2f} images/s", flush=True)
            for load in loads:
                out["runs"].append(run_rate(server, load, capacity, args, num_classes(server)))
        finally:
            server.stop()
    out["capacity_images_per_s"] = round(capacity, 3)
    out["machine"]["load_average_after"] = list(np.round(os.getloadavg(), 2))
    out["targets"] = targets(out["runs"])
    return out


def num_classes(server):
    return server.num_classes


def config(args):
    return {
        "window_s": args.window,
        "drain_limit_s": args.drain,
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "model": args.model or "shipped",
        "workload": {
            "n": list(N_RANGE),
            "steps": list(STEPS),
            "methods": ["ddim", "ddpm"],
            "guidance": [None, GUIDANCE],
        },
        "request_batching_window_s": POLICIES["request"].window,
        "policies": {mode: repr(POLICIES[mode]) for mode in args.modes.split(",")},
    }


def targets(runs):
    """(c) >= (b) images/s at every load; (c) p99 <= 0.6 x (b) p99 at 70%; at 120% the step server 503s."""
    by = {(r["mode"], r["load"]): r for r in runs}
    checks = {}
    for (mode, load), r in by.items():
        b = by.get(("request", load))
        if mode == "step" and b:
            checks[f"throughput_step_ge_request_at_{int(load * 100)}%"] = r["images_per_s"] >= b["images_per_s"]
            if abs(load - 0.7) < 1e-9:
                checks["p99_step_le_0.6x_request_at_70%"] = r["p99_s"] <= 0.6 * b["p99_s"]
                checks["p99_ratio_step_over_request_at_70%"] = round(r["p99_s"] / b["p99_s"], 3)
        if mode == "step" and load > 1:
            checks["queue_bound_step_503s_at_overload"] = r["rejected_503"] > 0
            rss = r["rss_mb"] or {}
            checks["rss_growth_mb_step_at_overload"] = round(rss.get("end", 0) - rss.get("start", 0), 1)
    return checks


def soak(args):
    """The step batcher at ~70% of its capacity for args.soak_minutes: RSS sampled every 5 s."""
    server = Server("step", args)
    try:
        info = machine(server, args)
        capacity = measure_capacity(server, args, num_classes(server))
        window = args.soak_minutes * 60
        rate = 0.7 * capacity / MEAN_N
        arrivals = poisson(rate, window, seed=7)
        bodies = workload(len(arrivals), seed=8, num_classes=num_classes(server))
        print(
            f"soak: {len(arrivals)} requests over {window:.0f} s at {rate:.2f}/s (capacity {capacity:.2f} img/s)",
            flush=True,
        )
        with RssSampler(server, period=5.0) as rss:
            results, unfinished, t0 = asyncio.run(open_loop(server.url, bodies, arrivals, args.drain))
    finally:
        server.stop()
    summary = summarize(results, unfinished, t0, window, rss.samples)
    return {
        "benchmark": f"soak: step batcher at 70% of capacity for {args.soak_minutes} min",
        "machine": info,
        "config": config(args) | {"window_s": window},
        "capacity_images_per_s": round(capacity, 3),
        "rate_rps": round(rate, 3),
        **summary,
        "rss_trend": rss_trend(rss.samples),
        "rss_samples": rss.samples,
    }


def rss_trend(samples):
    """RSS after the first minute: first, last, max, and least-squares slopes (MB/min) over it and its second half."""
    late = [(t, v) for t, v in samples if v is not None and t >= 60] or [(t, v) for t, v in samples if v is not None]
    if len(late) < 4:
        return None
    t, v = np.array(late).T
    half = len(t) // 2
    slope = lambda a, b: round(float(np.polyfit(a / 60.0, b, 1)[0]), 3)
    return {
        "after_1_min_mb": v[0],
        "last_mb": v[-1],
        "max_mb": v.max(),
        "slope_mb_per_min": slope(t, v),
        "second_half_slope_mb_per_min": slope(t[half:], v[half:]),
    }


def print_table(out):
    print("\nmode                                              load   images/s   p50 s   p99 s   503s")
    for r in out["runs"]:
        print(
            f"{LABELS[r['mode']]:50s} {int(r['load'] * 100):3d}%  {r['images_per_s']:8.2f}  {r['p50_s']:6.2f}  "
            f"{r['p99_s']:6.2f}  {r['rejected_503']:5d}"
        )
    print(json.dumps(out["targets"], indent=1))


def write_json(path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="ONNX model (default: the shipped one)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="backend threads (default: physical cores)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=128, help="images; the same bound for every mode")
    p.add_argument("--modes", default="step,request,solo", help="the first one's capacity sets the rates")
    p.add_argument("--loads", default="0.3,0.7,1.2", help="fractions of the measured capacity")
    p.add_argument("--window", type=float, default=60.0, help="seconds of arrivals per run")
    p.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the last responses")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of saturating load before measuring")
    p.add_argument("--capacity-seconds", type=float, default=30.0, help="closed-loop seconds measuring capacity")
    p.add_argument("--soak-minutes", type=float, default=None, help="soak mode: minutes at ~70%% load")
    p.add_argument("--note", default="", help="recorded as is, e.g. what else ran on the machine")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results/serve_<cpu>[_soak].json)")
    p.add_argument("--serve", choices=sorted(MODES), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


def main():
    args = parse_args()
    if args.serve:
        return serve(args)
    out = soak(args) if args.soak_minutes else benchmark(args)
    suffix = "_soak" if args.soak_minutes else ""
    name = f"serve_{cpu_slug(out['machine']['cpu'])}-{os.cpu_count()}c_{out['machine']['backend']}{suffix}.json"
    path = args.out or RESULTS / name
    write_json(path, out)
    if not args.soak_minutes:
        print_table(out)
    else:
        print(
            json.dumps({k: out[k] for k in ("images_per_s", "p50_s", "p99_s", "rejected_503", "rss_trend")}, indent=1)
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
