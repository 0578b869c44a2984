"""`ddengine bench`: per-step latency and images/s of the fused engine against its baselines."""
import importlib.util
import json
from pathlib import Path

import click

from ddengine.cli.sample import open_sampler


@click.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None, help="ONNX model (default: the shipped one).")
@click.option("--scheduler-config", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--backend", default="auto", show_default=True)
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size (repeatable; default 1, 16, 64).")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--method", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True)
@click.option("--guidance", type=float, default=None, help="Benchmark classifier-free guidance (doubled forward batch).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Timed runs per configuration (median reported).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--no-baselines", is_flag=True, help="Only the engine and the bare-forward floor.")
@click.option("--torch-checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training checkpoint of the model, for the diffusers + torch baseline.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Bar chart of images/s (needs matplotlib).")
def bench(model, scheduler_config, backend, batches, steps, method, eta, guidance, repeats, threads, no_baselines, torch_checkpoint,
          json_path, plot_path):
    """Per-step latency and images/s against baselines."""
    import ddengine
    from ddengine.bench import machine, run_benchmarks, summary
    from ddengine.output import OutputError, atomic_write, check_writable_dir
    from ddengine.sampler import InvalidParameterError

    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError("--plot needs matplotlib, which is not installed (pip install 'ddengine[bench]' or pip install matplotlib)")
    if repeats < 1:
        raise click.BadParameter(f"must be >= 1, got {repeats}", param_hint="--repeats")
    batches = batches or (1, 16, 64)
    sampler = open_sampler(model, scheduler_config, backend, threads)
    try:
        for batch in batches:
            classes = [i % sampler.spec.num_classes for i in range(batch)] if sampler.spec.conditional and batch > 0 else None
            sampler.plan(sampler.request(batch, steps, method, eta, classes=classes, guidance=guidance, batch_size=batch))
    except (InvalidParameterError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    try:
        for path in (json_path, plot_path):
            if path is not None:
                check_writable_dir(path.parent)
    except OutputError as err:
        raise click.UsageError(str(err)) from None
    before = machine()
    table = _Table(sampler, steps, method, eta, guidance)
    rows = run_benchmarks(sampler, batches, steps, method, eta, guidance, repeats, not no_baselines, log=table.add,
                          torch_checkpoint=torch_checkpoint)
    table.close()
    result = {"ddengine_version": ddengine.__version__, "model": sampler.model.path.name, "model_sha256": sampler.model.sha256,
              "backend": sampler.backend.name, "steps": steps, "method": method, "eta": eta, "guidance": guidance,
              "repeats": repeats, "machine": before, "load_average_after": machine()["load_average_1_5_15min"], "rows": [r.to_dict() for r in rows], "summary": summary(rows)}
    if json_path is not None:
        atomic_write(json_path, (json.dumps(result, indent=2) + "\n").encode())
    if plot_path is not None:
        _plot(rows, plot_path)


class _Table:
    """A rich table printed row by row as measurements finish."""

    HEADER = ("batch", "configuration", "total s", "ms/step", "images/s", "forward s", "step s", "other s", "vs floor")

    def __init__(self, sampler, steps, method, eta, guidance):
        from rich.console import Console

        self.console = Console(width=max(Console().width, 130))
        self.console.print(f"[bold]ddengine bench[/bold]: {sampler.model.path.name} on {sampler.backend.name}, {method} {steps} steps, "
                           f"eta {eta}, guidance {guidance}")
        self.rows, self.floor = [], {}

    def add(self, row):
        if row.name.startswith("floor"):
            self.floor[row.batch] = row.seconds
        self.rows.append(row)
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        self.console.print("  ".join([f"{row.batch:>5}", f"{row.name:<28}", fmt(row.seconds, "9.3f"), fmt(row.ms_per_step, "8.2f"),
                                      fmt(row.images_per_s, "9.1f"), fmt(row.forward_s, "9.3f"), fmt(row.step_s, "8.4f"),
                                      fmt(row.other_s, "8.4f"), row.note]), highlight=False)

    def close(self):
        from rich.table import Table

        table = Table(*self.HEADER, title="results (median of timed runs)")
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        for r in self.rows:
            floor = self.floor.get(r.batch)
            ratio = r.seconds / floor if r.seconds and floor else None
            note = f" ({r.note.split(' (')[0]})" if r.note else ""  # the full reason is in the JSON
            table.add_row(str(r.batch), r.name + note, fmt(r.seconds, ".3f"), fmt(r.ms_per_step, ".2f"),
                          fmt(r.images_per_s, ".1f"), fmt(r.forward_s, ".3f"), fmt(r.step_s, ".4f"), fmt(r.other_s, ".4f"), fmt(ratio, ".3f"))
        self.console.print(table)


def _plot(rows, path):
    """Grouped bars: images/s per configuration for each batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddengine.output import atomic_write

    names = list(dict.fromkeys(r.name for r in rows))
    batches = sorted({r.batch for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [next((r.images_per_s or 0 for r in rows if r.name == name and r.batch == b), 0) for b in batches]
        ax.bar([i + k * width for i in range(len(batches))], values, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("images/s")
    ax.legend(fontsize="small")
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
