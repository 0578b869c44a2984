"""Text-to-image benchmark: (a) per-stage time of the tiny pipeline on each CPU backend; (b) one U-Net step at
Stable Diffusion 1.5's size with random weights (no download): each CPU backend against torch, round-robin.

    python bench/bench_text2image.py [--threads 2] [--skip-tiny] [--skip-sd] [--unet sd15|small] [--rounds 3]

(a) builds the tiny random StableDiffusionPipeline of the tests, exports it, and times the text encoder, the
U-Net loop and the VAE decode of `--images` images per backend (ort-cpu fp32, openvino bf16, openvino fp32).
(b) builds a UNet2DConditionModel with SD 1.5's config, exports it to ONNX (external data over 1.5 GB) with
the engine's exporter, and times one forward at 64x64 latents, batch 2 (one guided step) with ONNX Runtime fp32,
OpenVINO bf16 and fp32, torch bf16 autocast and torch fp32, all alive at once and run round-robin; export and
compile times and peak resident memory per stage are recorded, and a stage that does not fit in memory is
recorded as skipped. Writes bench/results/text2image_<cpu>.json. Needs the export extra (torch, diffusers).
"""

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support.tiny_pipeline: the tiny pipeline of the tests

from ddengine.benchmark.harness import machine  # noqa: E402
from ddengine.files.atomic import atomic_write  # noqa: E402

SD15 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SMALL = SD15 | dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=64, norm_num_groups=8)  # a dry run of (b)
TINY_BACKENDS = (("ort-cpu", "fp32"), ("openvino", "bf16"), ("openvino", "fp32"))
PROMPTS = ("a photo of a cat", "a red shoe", "the blue bag", "a dog")


def memory():
    """{"rss": resident bytes now, "peak": the peak since the last reset_peak(), "available": MemAvailable}."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    kb = lambda v: int(v.split()[0]) * 1024  # noqa: E731
    return {"rss": kb(status["VmRSS"]), "peak": kb(status["VmHWM"]), "available": kb(info["MemAvailable"])}


def reset_peak():
    """Restart the VmHWM peak from the resident set now (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def watchdog(floor_gib=1.0, every=0.5):
    """Exit (code 3) when the machine's available memory falls below `floor_gib`: this run, not a neighbour, gives way."""
    import threading

    def watch():
        while True:
            available = memory()["available"] / 2**30
            if available < floor_gib:
                print(f"\nwatchdog: {available:.2f} GiB available (< {floor_gib}); stopping the benchmark", flush=True)
                os._exit(3)
            time.sleep(every)

    threading.Thread(target=watch, daemon=True).start()


def gib(n):
    return round(n / 2**30, 3)


class Stage:
    """`with Stage(record, name):` records the block's seconds, peak and final resident GiB under record[name]."""

    def __init__(self, record, name):
        self.record, self.name = record, name

    def __enter__(self):
        gc.collect()
        reset_peak()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        mem = memory()
        self.record[self.name] = {
            "seconds": round(time.perf_counter() - self.start, 3),
            "peak_rss_gib": gib(mem["peak"]),
            "rss_after_gib": gib(mem["rss"]),
            "available_after_gib": gib(mem["available"]),
        }
        print(f"  {self.name}: {self.record[self.name]}", flush=True)


class Timed:
    """A pipeline part wrapped to add its wall time to `self.totals[key]` (totals replaced per run)."""

    def __init__(self, part, key):
        self.part, self.key, self.totals = part, key, {}

    def __call__(self, **inputs):
        start = time.perf_counter()
        try:
            return self.part(**inputs)
        finally:
            self.totals[self.key] = self.totals.get(self.key, 0.0) + time.perf_counter() - start


def tiny_stages(args, work):
    """(a): median seconds per stage (text encoder, U-Net loop, VAE decode) per CPU backend, round-robin."""
    from ddengine import Sampler
    from ddengine.export.sd_export import export_pipeline
    from tests.support.tiny_pipeline import build_tiny_pipeline

    folder = build_tiny_pipeline(work / "tiny_pipeline")
    model = work / "tiny_model"
    export_pipeline(folder, model, log=lambda m: None)
    samplers = {f"{b} {p}": Sampler(model, backend=b, precision=p, threads=args.threads) for b, p in TINY_BACKENDS}
    parts = {}
    for name, s in samplers.items():
        conditioner, decoder = s.parts.conditioner, s.parts.decoder
        parts[name] = (conditioner.text_encoder, decoder.part)
        conditioner.text_encoder = Timed(conditioner.text_encoder, "text_encoder")
        decoder.part = Timed(decoder.part, "vae_decode")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    runs = {name: [] for name in samplers}
    for k in range(args.tiny_repeats + 1):  # the first round warms up (OpenVINO compiles per shape) and is dropped
        names = list(samplers)
        for name in names[k % len(names) :] + names[: k % len(names)]:
            s, totals = samplers[name], {}
            s.parts.conditioner.forget_prompts()  # the text encoder runs in every repeat
            s.parts.conditioner.text_encoder.totals = s.parts.decoder.part.totals = totals
            request = s.request(
                args.images,
                steps=args.steps,
                prompt=prompts,
                negative_prompt="blurry",
                guidance=7.5,
                batch_size=args.images,
            )
            start = time.perf_counter()
            s.run(request, timers=totals)
            totals["total"] = time.perf_counter() - start
            totals["unet_loop"] = totals.pop("forward") + totals.pop("step")
            if k:
                runs[name].append(totals)
    rows = []
    for name, measured in runs.items():
        median = {key: statistics.median(r[key] for r in measured) for key in measured[0]}
        text, vae = parts[name]
        backend = samplers[name].backend
        rows.append(
            {
                "backend": name,
                "unet": f"{backend.name} {getattr(backend, 'precision', 'fp32')}",
                "text_encoder": f"{text.name} {text.precision}",
                "vae_decoder": f"{vae.name} {vae.precision}",
                "median_s": {k: round(v, 5) for k, v in median.items()},
            }
        )
        print(f"  {name}: {rows[-1]['median_s']}", flush=True)
    return {
        "images": args.images,
        "steps": args.steps,
        "guidance": 7.5,
        "distinct_prompts": len(set(prompts)),
        "negative_prompt": "blurry",
        "repeats": args.tiny_repeats,
        "note": "text encoder: the distinct prompts and the negative prompt once per run (the cache is cleared); "
        "U-Net loop: every forward (guided: 2 rows per image) plus the fused step",
        "rows": rows,
    }


def sd_feeds(config):
    """One guided step's U-Net inputs: batch 2 (conditional and unconditional rows), 77 text tokens."""
    rng = np.random.default_rng(0)
    size, hidden = config["sample_size"], config["cross_attention_dim"]
    return {
        "sample": rng.standard_normal((2, 4, size, size)).astype(np.float32),
        "timestep": np.array([500, 500], np.int64),
        "encoder_hidden_states": rng.standard_normal((2, 77, hidden)).astype(np.float32),
    }


def sd_unet(args, work, config):
    """(b): one SD-1.5-size U-Net forward (batch 2 = one guided step) per runner, round-robin; stages recorded."""
    import torch
    from diffusers import UNet2DConditionModel

    from ddengine.export.onnx_export import export_graph, spec_for
    from ddengine.export.sd_export import text_unet
    from ddengine.model.load import load_model
    from ddengine.model.spec import METADATA_KEY

    torch.set_num_threads(args.threads)
    record = {
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "batch": 2,
        "memory_available_before_gib": gib(memory()["available"]),
        "stages": {},
    }
    stages = record["stages"]
    with Stage(stages, "build_torch_fp32"):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config).eval()
    record["parameters"] = sum(p.numel() for p in unet.parameters())
    feeds, module, path = sd_feeds(config), text_unet(unet), work / "unet.onnx"
    spec = spec_for(
        {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        4,
        config["sample_size"],
        config["sample_size"],
        0,
        text=True,
    )
    with Stage(stages, "export_onnx"), torch.inference_mode():
        export_graph(module, feeds, ["out"], path, metadata={METADATA_KEY: spec.to_json()})
    record["onnx_bytes"] = {p.name: p.stat().st_size for p in sorted(work.glob("unet.onnx*"))}
    with Stage(stages, "load_model"):
        load_model(path)
    runners, skipped = {}, {}
    onnx_gib = sum(record["onnx_bytes"].values()) / 2**30
    add_ort(runners, skipped, stages, path, args.threads, onnx_gib, feeds)
    add_openvino(runners, skipped, stages, path, args.threads, onnx_gib, feeds)
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

    def torch_forward(bf16):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return module(**tensors).float().numpy()

    runners["torch bf16 autocast"] = lambda: torch_forward(True)
    runners["torch fp32"] = lambda: torch_forward(False)
    record["skipped"] = skipped
    with Stage(stages, "round_robin"):
        record["forward"] = round_robin(runners, args.rounds)
    return record


def add_ort(runners, skipped, stages, path, threads, onnx_gib, feeds):
    """ONNX Runtime fp32 on the CPU with the engine's session options; skipped when it would not fit in memory."""
    import onnxruntime as ort

    from ddengine.backends.ort import session_options

    need = 1.3 * onnx_gib
    if memory()["available"] / 2**30 < need:
        skipped["ort-cpu fp32"] = f"{gib(memory()['available'])} GiB available; the session needs about {need:.1f}"
        return
    opts = session_options(threads)
    opts.enable_cpu_mem_arena = (
        False  # else the forward's ~5 GB of attention buffers stay resident while the others run
    )
    with Stage(stages, "ort_session_fp32"):
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    runners["ort-cpu fp32"] = lambda: session.run(None, feeds)[0]


def add_openvino(runners, skipped, stages, path, threads, onnx_gib, feeds):
    """OpenVINO (the engine's OpenVinoGraph) compiled for batch 2, bf16 and fp32; a precision that would not fit is skipped."""
    from ddengine.backends.openvino import OpenVinoGraph

    graph = None
    for precision, share in (("bf16", 0.6), ("fp32", 1.1)):
        need = share * onnx_gib + (onnx_gib if graph is None else 0)
        if memory()["available"] / 2**30 < need:
            skipped[f"openvino {precision}"] = (
                f"{gib(memory()['available'])} GiB available; compiling needs about {need:.1f}"
            )
            continue
        with Stage(stages, f"openvino_compile_{precision}"):
            graph = graph or OpenVinoGraph(path, precision, threads)
            graph.compile({k: v.shape for k, v in feeds.items()}, precision)
        runners[f"openvino {precision}"] = lambda g=graph, p=precision: g.infer(feeds, precision=p)
    if graph is not None:
        with Stage(stages, "openvino_drop_source_model"):
            graph.graph = None  # both precisions are compiled: the ONNX it read is no longer needed


def round_robin(runners, rounds):
    """Each runner once to warm up, then `rounds` rounds in a rotating order; seconds and agreement with torch fp32."""
    outputs, first, resident, times = {}, {}, {}, {name: [] for name in runners}
    for name, fn in runners.items():
        start = time.perf_counter()
        outputs[name] = np.asarray(fn(), dtype=np.float32)
        first[name] = time.perf_counter() - start
        resident[name] = gib(memory()["rss"])
        print(f"  warm-up {name}: {first[name]:.2f} s, resident {resident[name]} GiB", flush=True)
    names = list(runners)
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    want = outputs["torch fp32"]
    rows = []
    for name in names:
        err = float(np.max(np.abs(outputs[name] - want)))
        rows.append(
            {
                "runner": name,
                "median_s": round(statistics.median(times[name]), 3),
                "best_s": round(min(times[name]), 3),
                "first_s": round(first[name], 3),
                "runs_s": [round(t, 3) for t in times[name]],
                "resident_after_warm_up_gib": resident[name],
                "max_abs_vs_torch_fp32": err,
                "rel_vs_torch_fp32": err / float(np.max(np.abs(want))),
            }
        )
        print(f"  {name}: median {rows[-1]['median_s']} s, max |vs torch fp32| {err:.3g}", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--images", type=int, default=4, help="(a) images per run (one batch)")
    p.add_argument("--steps", type=int, default=30, help="(a) sampling steps")
    p.add_argument("--tiny-repeats", type=int, default=5)
    p.add_argument("--unet", choices=("sd15", "small"), default="sd15", help="(b) small: a dry run of the same code")
    p.add_argument("--rounds", type=int, default=3, help="(b) round-robin rounds")
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument(
        "--work", default=None, help="folder for the exported models (default: the system's temporary folder)"
    )
    args = p.parse_args(argv)
    result = {
        "benchmark": "text-to-image: per-stage time (tiny pipeline) and one SD-1.5-size U-Net step",
        "machine": machine(),
        "threads": args.threads,
    }
    print(
        f"{result['machine']['cpu']}, {result['machine']['isa_flags']}, load {result['machine']['load_average_1_5_15min']}"
    )
    cpu = re.sub(r"[^a-z0-9]+", "-", result["machine"]["cpu"].lower()).strip("-")
    suffix = "" if args.unet == "sd15" or args.skip_sd else f"_{args.unet}"
    path = Path(args.out) / f"text2image_{cpu}{suffix}.json"
    watchdog()
    with tempfile.TemporaryDirectory(prefix="bench_t2i_", dir=args.work) as tmp:
        if not args.skip_tiny:
            print("(a) tiny pipeline, per stage", flush=True)
            result["tiny_pipeline"] = tiny_stages(args, Path(tmp))
            atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())  # kept if (b) does not finish
        if not args.skip_sd:
            print(f"(b) {args.unet} U-Net, one step at batch 2", flush=True)
            (Path(tmp) / "sd").mkdir()
            result[f"unet_{args.unet}"] = sd_unet(args, Path(tmp) / "sd", SD15 if args.unet == "sd15" else SMALL)
    result["load_average_after"] = machine()["load_average_1_5_15min"]
    atomic_write(path, (json.dumps(result, indent=2) + "\n").encode())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
