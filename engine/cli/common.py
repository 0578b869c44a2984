"""What the CLI commands share: the sampler options, opening a Sampler, progress, interruption and exit codes."""

import math
import signal
import sys
from pathlib import Path

import click

from ddengine.core.plan import METHODS
from ddengine.core.timesteps import SPACINGS

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EXIT_SIGNAL_BASE = 128  # a run stopped by signal N exits 128 + N (130 for Ctrl-C, 143 for SIGTERM)


def model_options(command):
    """--model, --scheduler-config, --backend, --precision, --threads."""
    for option in reversed(
        [
            click.option(
                "--model",
                type=click.Path(path_type=Path),
                default=None,
                help="An ONNX model or a text-to-image MODEL_DIR (default: the shipped model).",
            ),
            click.option(
                "--scheduler-config",
                type=click.Path(path_type=Path),
                default=None,
                help="A diffusers scheduler_config.json: a whole one replaces the model's schedule, a partial one "
                "overrides only the sampling keys it names.",
            ),
            click.option(
                "--backend", default="auto", show_default=True, help="auto, or a backend `ddengine info` lists."
            ),
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default="auto",
                show_default=True,
                help="The forward's precision: auto = the backend's best on this machine (`ddengine info`).",
            ),
            click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores)."),
        ]
    ):
        command = option(command)
    return command


def finite_seconds(ctx, param, value):
    """A click callback: a duration must be a finite number (FloatRange lets nan and inf through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"expected a finite number of seconds, got {value}")
    return value


def param_option(field, *decls, **options):
    """A click option for a SamplingParams field (engine/runtime/params.py): default and help from its schema."""
    from ddengine.runtime.params import SamplingParams

    spec = SamplingParams.model_fields[field]
    options.setdefault("default", spec.default)
    options.setdefault("help", spec.description)
    options.setdefault("show_default", options["default"] is not None)
    return click.option(*decls, field, **options)


def schedule_options(command):
    """--steps, --method, --eta, --spacing."""
    for option in reversed(
        [
            param_option("steps", "--steps", type=int),
            param_option("method", "--method", type=click.Choice(METHODS)),
            param_option("eta", "--eta", type=float),
            param_option("spacing", "--spacing", type=click.Choice(SPACINGS)),
        ]
    ):
        command = option(command)
    return command


def open_sampler(model, scheduler_config, backend, threads=None, precision="auto"):
    """A Sampler for the CLI; model, backend and parameter problems become usage errors (exit 2)."""
    from ddengine.runtime.sampler import Sampler

    return usage_errors(
        Sampler, model, backend=backend, scheduler_config=scheduler_config, threads=threads, precision=precision
    )


def check_output_files(**paths):
    """Each given output file (option name -> path or None): its folder exists and its name fits the file system."""
    from ddengine.files.atomic import OutputError, check_name

    for option, path in paths.items():
        if path is None:
            continue
        try:
            check_name(path, option)
        except OutputError as err:
            raise click.UsageError(str(err)) from None
        if not Path(path).resolve().parent.is_dir():
            raise click.UsageError(f"{option} {path}: output folder {Path(path).parent} does not exist")


def usage_errors(fn, *args, **kwargs):
    """fn(*args, **kwargs), with the engine's input errors raised as click.UsageError (exit 2, no traceback)."""
    from ddengine.backends import BackendError
    from ddengine.files.atomic import OutputError
    from ddengine.model.load import ModelError
    from ddengine.runtime.params import InvalidParameterError

    try:
        return fn(*args, **kwargs)
    except (ModelError, BackendError, InvalidParameterError, OutputError) as err:
        raise click.UsageError(str(err)) from None


def progress_bar(quiet, unit="steps"):
    """A rich progress bar on stderr (a no-op context when quiet): each task's description, done/total `unit`,
    its rate, a task's `images` field when it has one, elapsed and remaining time."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            return Text("" if task.speed is None else f"{task.speed:.1f}/s")

    class FieldColumn(ProgressColumn):
        def render(self, task):
            return Text(str(task.fields.get("images", "")))

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=12),
        MofNCompleteColumn(),
        TextColumn(unit),
        RateColumn(),
        FieldColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
        transient=False,
    )


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; raised at the next safe point (between images and between steps)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """Within the block, SIGINT/SIGTERM only set a flag; `check()` raises Interrupted at a point of our choosing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum, self._old = None, {}
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum, frame):
        self.signum = self.signum or signum

    def check(self):
        if self.signum is not None:
            raise Interrupted(self.signum)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def exit_interrupted(err, message):
    click.echo(f"{message} ({err})", err=True)
    sys.exit(EXIT_SIGNAL_BASE + err.signum)
