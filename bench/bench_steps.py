"""Quality per step: FID and accuracy of each solver at 5..50 steps on one model, a plot, and the recommended pair.

    python bench/bench_steps.py [--n 1000] [--guidance G] [--out bench/results] [--plot docs/steps.png]

Runs `ddengine eval`'s measurement (engine/quality/evaluate.py) for every METHOD x STEPS pair at the model's
recommended guidance, the same seed and N for all, and writes bench/results/steps_<cpu>.json after every run (a
rerun resumes: pairs already in the file are kept). The recommendation is the fewest steps whose FID is <= 1.1x
DDIM-50's, ties broken by the lower FID; `ddengine export CHECKPOINT --recommended-method M --recommended-steps S`
stores it in the model.
"""

import argparse
import json
import re
import sys
from pathlib import Path

from ddengine.benchmark.harness import machine
from ddengine.files.atomic import atomic_write
from ddengine.quality.evaluate import FeatureNet, evaluate, real_images
from ddengine.runtime.sampler import Sampler

METHODS = ["ddim", "dpmpp-2m", "dpmpp-3m", "unipc", "euler"]
STEPS = [5, 8, 10, 15, 20, 50]
REFERENCE = ("ddim", 50)
TOLERANCE = 1.1


def recommended(rows):
    """The (method, steps) with the fewest steps whose FID is <= TOLERANCE x the reference's; None if it is missing."""
    by_pair = {(r["method"], r["steps"]): r for r in rows}
    if REFERENCE not in by_pair:
        return None
    bound = TOLERANCE * by_pair[REFERENCE]["fid"]
    good = [r for r in rows if r["fid"] <= bound]
    best = min(good, key=lambda r: (r["steps"], r["fid"]))
    return {"method": best["method"], "steps": best["steps"], "fid": best["fid"], "fid_bound": bound}


def plot(rows, path, title):
    """FID against steps, one line per solver, log-log, with the 1.1x DDIM-50 bound (docs/steps.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in METHODS:
        pts = sorted((r["steps"], r["fid"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ref = [r for r in rows if (r["method"], r["steps"]) == REFERENCE]
    if ref:
        ax.axhline(TOLERANCE * ref[0]["fid"], color="grey", ls="--", lw=1, label="1.1x DDIM-50")
    ax.set(xscale="log", yscale="log", xlabel="steps (model evaluations per image)", ylabel="FID (lower is better)")
    ticks = sorted({r["steps"] for r in rows})
    ax.set_xticks(ticks, [str(s) for s in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's recommended guidance, else 1.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", action="append", default=None, help=f"repeatable (default: {' '.join(METHODS)})")
    p.add_argument("--steps", action="append", type=int, default=None, help=f"repeatable (default: {STEPS})")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    p.add_argument("--plot", default=str(Path(__file__).parent.parent / "docs" / "steps.png"))
    args = p.parse_args(argv)
    sampler = Sampler(args.model)
    guidance = args.guidance if args.guidance is not None else (sampler.spec.recommended_guidance or 1.5)
    net = FeatureNet()
    test_features = net(real_images("test")[0])[1]
    cpu = re.sub(r"[^a-z0-9]+", "-", machine()["cpu"].lower()).strip("-")
    path = Path(args.out) / f"steps_{cpu}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    if result.get("model_sha256", sampler.model.sha256) != sampler.model.sha256 or result.get("n", args.n) != args.n:
        sys.exit(f"{path} holds another model or N; move it away to start over")
    done = {(r["method"], r["steps"]) for r in result["rows"]}
    for method in args.method or METHODS:
        for steps in args.steps or STEPS:
            if (method, steps) in done:
                continue
            row, _ = evaluate(sampler, net, test_features, args.n, steps, guidance, args.seed, 100, method)
            result["rows"].append(row)
            print(f"{method:9} {steps:3d} steps: FID {row['fid']:.3f}, accuracy {row['accuracy']:.3f}", flush=True)
            result.update(
                benchmark="bench/bench_steps.py: FID and accuracy per solver and steps",
                model_sha256=sampler.model.sha256,
                backend=sampler.backend.name,
                precision=sampler.backend.precision,
                n=args.n,
                seed=args.seed,
                guidance=guidance,
                machine=machine(),
                recommended=recommended(result["rows"]),
            )
            atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    title = f"shipped model, guidance {guidance:g}, N={args.n}, {sampler.backend.name} {sampler.backend.precision}"
    plot(result["rows"], Path(args.plot), title)
    print(f"wrote {path} and {args.plot}; recommended: {result.get('recommended')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
