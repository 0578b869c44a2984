"""int8 on OpenVINO (NNCF post-training quantization) against bf16 and fp32: bare-forward speed and whole-run quality.

    pip install nncf && python bench/bench_int8.py [--calibration 512] [--n 40] [--fid-n 1000] [--out bench/results]

Calibration (NNCF's min-max statistics and fast bias correction): Fashion-MNIST training images noised to the
timesteps of a 50-step DDIM plan, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4), with the
null class on 15% of rows as in training. The int8 graph runs with bf16 (where native) for the ops NNCF leaves
unquantized, and the noisiest rows in fp32 as the bf16 backend does. Quality: the reduced-precision gate of
bench_quality.py (PSNR >= 35 dB against ONNX Runtime fp32 on every image) and the project's FID and accuracy.
Speed: the bare forward at batch 1, 16 and 64, every runner in turn, median of --repeats rounds.
Writes bench/results/int8_<cpu>.json.
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from bench_quality import gate_rows  # bench/ is on sys.path when this script runs

from ddengine.benchmark.harness import machine
from ddengine.files.atomic import atomic_write
from ddengine.runtime.sampler import Sampler

P_NULL = 0.15


def calibration_items(spec, n, seed, batch=8):
    """Model inputs {name: array} for NNCF: noised training images at DDIM-50 timesteps, their classes or null."""
    from ddengine.core.plan import make_plan
    from ddengine.quality.fashion_mnist import load

    rng = np.random.default_rng(seed)
    x0, labels = load("train")
    pick = rng.choice(len(x0), size=n, replace=False)
    x0, labels = x0[pick], labels[pick]
    t = rng.choice(np.asarray(make_plan(spec.scheduler, 50).timesteps), size=n)
    abar = spec.schedule.alphas_cumprod()[t].astype(np.float32).reshape(-1, 1, 1, 1)
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * rng.standard_normal(x0.shape, dtype=np.float32)
    labels = np.where(rng.random(n) < P_NULL, spec.null_class, labels)
    names = {role: spec.io[role].name for role in spec.roles()}
    return [
        {
            names["sample"]: x_t[i : i + batch],
            names["timestep"]: t[i : i + batch].astype(np.int64),
            names["class_labels"]: labels[i : i + batch].astype(np.int64),
        }
        for i in range(0, n, batch)
    ]


def quantized_sampler(model, items):
    """A Sampler on OpenVINO whose graph is the NNCF int8 quantization of the model's."""
    import nncf

    sampler = Sampler(model, backend="openvino", precision="auto")
    graph = sampler.backend.graph
    graph.graph = nncf.quantize(
        graph.graph,
        nncf.Dataset(items),
        subset_size=len(items),
        preset=nncf.QuantizationPreset.MIXED,
        fast_bias_correction=True,
    )
    graph._compiled.clear()  # noqa: SLF001  (compiled lazily again, from the int8 graph)
    return sampler


def forward_ms(samplers, batches, repeats, seed=0):
    """{label: {batch: median ms}} of the bare forward, the runners taking turns in every round."""
    rng = np.random.default_rng(seed)
    spec = next(iter(samplers.values())).spec
    out = {label: {} for label in samplers}
    for b in batches:
        feeds = {
            "sample": rng.standard_normal((b, spec.channels, spec.height, spec.width), dtype=np.float32),
            "timestep": rng.integers(0, 900, b),
            "class_labels": rng.integers(0, 10, b),
        }
        result = np.empty((b, spec.channels, spec.height, spec.width), np.float32)
        times = {label: [] for label in samplers}
        for s in samplers.values():
            s.backend.run(feeds, result)  # compile this shape before timing
        for _ in range(repeats):
            for label, s in samplers.items():
                start = time.perf_counter()
                for _ in range(5):
                    s.backend.run(feeds, result)
                times[label].append((time.perf_counter() - start) / 5 * 1e3)
        for label in samplers:
            out[label][b] = float(np.median(times[label]))
    return out


def fid_rows(samplers, n, seed):
    """{label: the project's eval row at the recommended guidance} (FID vs the test set, conditional accuracy)."""
    from ddengine.quality.evaluate import FeatureNet, evaluate, real_images

    net = FeatureNet()
    _, test_features = net(real_images("test")[0])
    out = {}
    for label, s in samplers.items():
        g = s.spec.recommended_guidance or 1.5
        row, _ = evaluate(s, net, test_features, n, 50, g, seed, 100)
        out[label] = {k: row[k] for k in ("guidance", "n", "fid", "accuracy")}
        print(f"{label}: FID {row['fid']:.2f}, accuracy {row['accuracy']:.3f}", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--calibration", type=int, default=512, help="calibration inputs (noised training images)")
    p.add_argument("--n", type=int, default=40, help="images per quality setting")
    p.add_argument("--fid-n", type=int, default=1000, help="images for FID and accuracy (0: skip)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    reference = Sampler(args.model, backend="ort-cpu")
    start = time.perf_counter()
    int8 = quantized_sampler(reference.model, calibration_items(reference.spec, args.calibration, args.seed))
    seconds = time.perf_counter() - start
    native = Sampler(reference.model, backend="openvino", precision="auto")
    samplers = {
        "ort-cpu fp32": reference,
        f"openvino {native.backend.precision}": native,
        f"openvino int8+{int8.backend.precision}": int8,
    }
    result = {
        "machine": machine(),
        "model_sha256": reference.model.sha256,
        "calibration": args.calibration,
        "quantize_seconds": seconds,
        "forward_ms": forward_ms(samplers, (1, 16, 64), args.repeats),
        "quality": gate_rows(reference, int8, args.n, args.seed, f"openvino:int8+{int8.backend.precision}"),
    }
    for label, by_batch in result["forward_ms"].items():
        print(f"{label:24} " + "  ".join(f"b{b} {ms:.2f} ms" for b, ms in by_batch.items()), flush=True)
    if args.fid_n:
        result["fid"] = fid_rows({k: v for k, v in samplers.items() if k != "ort-cpu fp32"}, args.fid_n, 0)
    cpu = re.sub(r"[^a-z0-9]+", "-", result["machine"]["cpu"].lower()).strip("-")
    path = Path(args.out) / f"int8_{cpu}.json"
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
