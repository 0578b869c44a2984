"""The reduced-precision quality gate over whole runs: every image of each backend against ONNX Runtime fp32 (PSNR).

    python bench/bench_quality.py [--n 40] [--backend openvino:bf16 ...] [--out bench/results]

Settings: DDIM 50 steps and DDPM 100 steps, each without and with guidance (the model's recommended scale, else
1.5), one class per image in turn, the same seeds on every backend. Gate: PSNR >= 35 dB on every image. Writes
bench/results/quality_<cpu>.json with the per-image PSNRs, their minimum and median, and the machine.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from ddengine.benchmark.harness import machine
from ddengine.files.atomic import atomic_write
from ddengine.quality.metrics import psnr
from ddengine.runtime.sampler import Sampler

GATE_DB = 35.0
SETTINGS = [("ddim", 50, False), ("ddim", 50, True), ("ddpm", 100, False), ("ddpm", 100, True)]


def gate_rows(reference, sampler, n, seed, label):
    """Every SETTINGS run of `sampler` against the ORT fp32 `reference` from the same seeds: per-image PSNR, gate."""
    spec = reference.spec
    g = spec.recommended_guidance or 1.5
    rows = []
    for method, steps, guided in SETTINGS:
        kwargs = dict(
            steps=steps,
            method=method,
            seed=seed,
            classes="all" if spec.conditional else None,
            guidance=g if guided else (1.0 if spec.conditional else None),
            batch_size=20,
        )
        want, _ = reference.sample(n, **kwargs)
        got, records = sampler.sample(n, **kwargs)
        db = psnr(got, want, per_image=True)
        row = {
            "backend": sampler.backend.name,
            "precision": label.partition(":")[2] or sampler.backend.precision,
            "method": method,
            "steps": steps,
            "guidance": kwargs["guidance"],
            "min_db": float(db.min()),
            "median_db": float(np.median(db)),
            "failed": sum(r["status"] != "ok" for r in records),
            "passes": bool(db.min() >= GATE_DB),
            "psnr_db": [round(float(v), 2) for v in db],
        }
        rows.append(row)
        print(
            f"{label:16} {method} {steps:3d} guidance {kwargs['guidance']}: min {row['min_db']:.1f} dB, "
            f"median {row['median_db']:.1f} dB -> {'pass' if row['passes'] else 'FAIL'}",
            flush=True,
        )
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=40, help="images per setting")
    p.add_argument("--backend", action="append", default=None, help="NAME or NAME:PRECISION (default: openvino:bf16)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args(argv)
    reference = Sampler(args.model, backend="ort-cpu")
    result = {"machine": machine(), "model_sha256": reference.model.sha256, "gate_db": GATE_DB, "n": args.n, "rows": []}
    for label in args.backend or ["openvino:bf16"]:
        name, _, precision = label.partition(":")
        sampler = Sampler(reference.model, backend=name, precision=precision or "auto")
        result["rows"] += gate_rows(reference, sampler, args.n, args.seed, label)
    cpu = re.sub(r"[^a-z0-9]+", "-", result["machine"]["cpu"].lower()).strip("-")
    path = Path(args.out) / f"quality_{cpu}.json"
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}")
    return 0 if all(r["passes"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
