"""Why the OpenVINO backend compiles one static-shape model per row count: forward latency of a static-shape
compiled model against one dynamic-batch model, bf16 and fp32, next to ONNX Runtime fp32, on the same ONNX file.

    python bench/bench_openvino_shapes.py [--model M.onnx] [--batches 1,16,64] [--threads 2] [--repeats 30]

Median and best milliseconds per forward, round-robin; compile seconds per variant. Writes
bench/results/openvino_shapes_<cpu>.json.
"""

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import numpy as np

from ddengine.backends.ort import session_options
from ddengine.benchmark.harness import machine
from ddengine.files.atomic import atomic_write
from ddengine.model.load import load_model


def compiled(core, path, spec, precision, rows, threads):
    """(request, compile seconds): static for `rows`, or one dynamic-batch model when rows is None."""
    graph = core.read_model(str(path))
    if rows is not None:
        graph.reshape({spec.io[r].name: list(spec.io[r].at(rows)) for r in spec.roles()})
    start = time.perf_counter()
    model = core.compile_model(
        graph,
        "CPU",
        {
            "INFERENCE_PRECISION_HINT": precision,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(threads),
        },
    )
    return model.create_infer_request(), time.perf_counter() - start


def main(argv=None):
    import onnxruntime as ort
    import openvino as ov

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    model, core = load_model(args.model), ov.Core()
    spec = model.spec
    session = ort.InferenceSession(str(model.path), session_options(args.threads), providers=["CPUExecutionProvider"])
    dynamic = {prec: compiled(core, model.path, spec, prec, None, args.threads) for prec in ("bf16", "f32")}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        rng = np.random.default_rng(0)
        feeds = {
            "sample": rng.standard_normal((batch, *spec.image_shape)).astype(np.float32),
            "timestep": np.full(batch, 500, dtype=np.int64),
        }
        if spec.conditional:
            feeds["class_labels"] = np.arange(batch, dtype=np.int64) % spec.num_classes
        runners = {"ort_fp32": lambda feeds=feeds: session.run(None, feeds)}
        compile_s = {}
        for prec in ("bf16", "f32"):
            static, compile_s[f"static_{prec}"] = compiled(core, model.path, spec, prec, batch, args.threads)
            runners[f"openvino_static_{prec}"] = lambda r=static, feeds=feeds: r.infer(feeds)
            runners[f"openvino_dynamic_{prec}"] = lambda r=dynamic[prec][0], feeds=feeds: r.infer(feeds)
        times = {name: [] for name in runners}
        for fn in runners.values():
            fn()
        names = list(runners)
        for k in range(args.repeats):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                start = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - start)
        row = {
            "batch": batch,
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "best_ms": {k: 1e3 * min(v) for k, v in times.items()},
            "compile_s": compile_s,
        }
        rows.append(row)
        print(batch, {k: round(v, 2) for k, v in row["median_ms"].items()}, flush=True)
    result = {
        "machine": machine(),
        "model_sha256": model.sha256,
        "threads": args.threads,
        "repeats": args.repeats,
        "dynamic_compile_s": {k: v[1] for k, v in dynamic.items()},
        "rows": rows,
    }
    cpu = re.sub(r"[^a-z0-9]+", "-", result["machine"]["cpu"].lower()).strip("-")
    path = Path(args.out) / f"openvino_shapes_{cpu}.json"
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
