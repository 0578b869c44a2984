"""`ddengine bench`: the engine on each CPU backend against its bare-forward floor and the torch/OpenVINO baselines."""

import importlib.util
import json
from pathlib import Path

import click

from ddengine.cli.common import check_output_files, open_sampler, schedule_options, usage_errors


@click.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help="ONNX model (default: the shipped one).")
@click.option("--scheduler-config", type=click.Path(path_type=Path), default=None)
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="Backend to measure, NAME or NAME:PRECISION (repeatable; default: auto and every CPU backend installed here, "
    "OpenVINO in bf16 and fp32).",
)
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size (repeatable; default 1, 16, 64).")
@schedule_options
@click.option(
    "--guidance", type=float, default=None, help="Benchmark classifier-free guidance (doubled forward batch)."
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Timed runs per configuration (median reported).",
)
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--no-baselines", is_flag=True, help="Only the engine and the bare-forward floor of each backend.")
@click.option(
    "--torch-weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The model's torch twin (.safetensors; default: the one next to the model) for the torch baselines.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the results as JSON.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Bar chart of images/s (needs matplotlib).",
)
def bench(
    model,
    scheduler_config,
    backends,
    batches,
    steps,
    method,
    eta,
    spacing,
    guidance,
    repeats,
    threads,
    no_baselines,
    torch_weights,
    json_path,
    plot_path,
):
    """Per-step latency and images/s against baselines."""
    import ddengine
    from ddengine.backends import CPU_BACKENDS, auto_choice, available_backends
    from ddengine.benchmark.harness import bench_request, load_average, machine, run_benchmarks, summary
    from ddengine.files.atomic import atomic_write
    from ddengine.runtime.params import bind_schedule

    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError(
            "--plot needs matplotlib, which is not installed (pip install 'ddengine[bench]' or pip install matplotlib)"
        )
    check_output_files(**{"--json": json_path, "--plot": plot_path})
    batches = batches or (1, 16, 64)
    auto = auto_choice()
    backends = backends or default_backends(auto, available_backends(), CPU_BACKENDS)
    samplers = {}
    for label in dict.fromkeys(backends):
        name, precision = parse_backend(label)
        samplers[label] = open_sampler(model, scheduler_config, name, threads, precision)
    steps, method = bind_schedule(next(iter(samplers.values())).spec, steps, method, eta)
    for sampler in samplers.values():
        for batch in batches:
            usage_errors(bench_request, sampler, batch, steps, method, eta, guidance, spacing)
    before = machine()
    table = _Table(samplers, steps, method, eta, guidance)
    rows = run_benchmarks(
        samplers,
        batches,
        steps,
        method,
        eta,
        guidance,
        repeats,
        not no_baselines,
        log=table.add,
        torch_weights=torch_weights,
        spacing=spacing,
    )
    table.close()
    first = next(iter(samplers.values()))
    result = {
        "ddengine_version": ddengine.__version__,
        "model": first.model.path.name,
        "model_sha256": first.model.sha256,
        "backends": {k: {"name": s.backend.name, "precision": s.backend.precision} for k, s in samplers.items()},
        "auto": {"name": auto.name, "precision": auto.precision, "reason": auto.reason},
        "steps": steps,
        "method": method,
        "eta": eta,
        "guidance": guidance,
        "spacing": spacing,
        "threads": threads,
        "repeats": repeats,
        "machine": before,
        "load_average_after": load_average(),
        "rows": [r.to_dict() for r in rows],
        "summary": summary(rows, samplers),
    }
    if json_path is not None:
        atomic_write(json_path, (json.dumps(result, indent=2) + "\n").encode())
    if plot_path is not None:
        _plot(rows, plot_path)


def default_backends(auto, available, cpu_backends):
    """auto, then every installed CPU backend at each of its precisions ("openvino:bf16", "openvino:fp32", ...)."""
    from ddengine.backends import BACKENDS

    labels = ["auto"]
    for name in cpu_backends:
        if name in available:
            precisions = [p for p in BACKENDS[name].precisions if p != "auto"]
            labels += [name] if len(precisions) == 1 else [f"{name}:{p}" for p in precisions]
    return labels


def parse_backend(label):
    """'openvino:bf16' -> ('openvino', 'bf16'); 'ort-cpu' -> ('ort-cpu', 'auto'); 'tensorrt:X.plan' (an engine
    file, not a precision) -> ('tensorrt:X.plan', 'auto')."""
    from ddengine.backends import BACKENDS

    name, _, precision = label.partition(":")
    entry = BACKENDS.get(name)
    if precision and entry is not None and "engine" in entry.takes and precision not in entry.precisions:
        return label, "auto"
    return name, precision or "auto"


class _Table:
    """A rich table printed row by row as measurements finish."""

    HEADER = ("batch", "configuration", "total s", "ms/step", "images/s", "forward s", "step s", "other s")

    def __init__(self, samplers, steps, method, eta, guidance):
        from rich.console import Console

        self.console = Console(width=max(Console().width, 150))
        first = next(iter(samplers.values()))
        backends = ", ".join(f"{k} = {s.backend.name} {s.backend.precision}" for k, s in samplers.items())
        self.console.print(
            f"[bold]ddengine bench[/bold]: {first.model.path.name} on {backends}; {method} {steps} steps, "
            f"eta {eta}, guidance {guidance}"
        )
        self.rows = []

    def add(self, row):
        self.rows.append(row)
        self.console.print(
            "  ".join(
                [
                    f"{row.batch:>5}",
                    f"{row.name:<52}",
                    _fmt(row.seconds, "9.3f"),
                    _fmt(row.ms_per_step, "8.2f"),
                    _fmt(row.images_per_s, "9.1f"),
                    _fmt(row.forward_s, "9.3f"),
                    _fmt(row.step_s, "8.4f"),
                    _fmt(row.other_s, "8.4f"),
                    row.note,
                ]
            ),
            highlight=False,
        )

    def close(self):
        from rich.table import Table

        table = Table(*self.HEADER, title="results (the run closest to the median)")
        for r in self.rows:
            note = f" ({r.note.split(' (')[0]})" if r.note else ""  # the full reason is in the JSON
            table.add_row(
                str(r.batch),
                r.name + note,
                _fmt(r.seconds, ".3f"),
                _fmt(r.ms_per_step, ".2f"),
                _fmt(r.images_per_s, ".1f"),
                _fmt(r.forward_s, ".3f"),
                _fmt(r.step_s, ".4f"),
                _fmt(r.other_s, ".4f"),
            )
        self.console.print(table)


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _plot(rows, path):
    """Grouped bars: images/s per configuration for each batch size."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddengine.files.atomic import atomic_write

    names = list(dict.fromkeys(r.name for r in rows))
    batches = sorted({r.batch for r in rows})
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [next((r.images_per_s or 0 for r in rows if r.name == name and r.batch == b), 0) for b in batches]
        ax.bar([i + k * width for i in range(len(batches))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("images/s")
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
