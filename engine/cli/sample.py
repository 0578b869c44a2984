"""`ddengine sample`: generate images to a folder (one file per image + manifest.jsonl), optionally a grid."""
import dataclasses
import sys
from pathlib import Path

import click

SPACINGS = ("leading", "trailing", "linspace")


def open_sampler(model, scheduler_config, backend, threads=None):
    """A Sampler for the CLI; model and backend problems become usage errors (exit 2)."""
    from ddengine.backends import BackendError
    from ddengine.model import ModelError
    from ddengine.sampler import InvalidParameterError, Sampler

    try:
        return Sampler(model, backend=backend, scheduler_config=scheduler_config, threads=threads)
    except (ModelError, BackendError, InvalidParameterError) as err:
        raise click.UsageError(str(err)) from None


def parse_classes(values, spec, n):
    """--class values -> None, or one label per image (cycling through the given ones; `all` = every class)."""
    if not values:
        return None
    if "all" in values:
        if len(values) > 1:
            raise click.BadParameter(f"'all' cannot be combined with other classes, got {list(values)}", param_hint="--class")
        if not spec.conditional:
            raise click.BadParameter("'all' needs a class-conditional model; this model is unconditional (num_classes = 0)", param_hint="--class")
        values = range(spec.num_classes)
    try:
        labels = [int(v) for v in values]
    except ValueError:
        raise click.BadParameter(f"expected integers or 'all', got {list(values)}", param_hint="--class") from None
    return [labels[i % len(labels)] for i in range(n)]


def make_plan_or_fail(sampler, request):
    """The request's StepPlan; schedule problems are usage errors."""
    try:
        return sampler.plan(request)
    except ValueError as err:
        raise click.UsageError(str(err)) from None


def check_png_channels(channels, fmt, grid, trajectory):
    """PNG outputs (images, --grid, --trajectory strips) need 1, 3 or 4 channels."""
    if channels in (1, 3, 4):
        return
    for used, hint in ((fmt == "png", "--format"), (grid is not None, "--grid"), (bool(trajectory), "--trajectory")):
        if used:
            raise click.BadParameter(f"PNG needs 1, 3 or 4 channels, the model makes {channels}; "
                                     "use --format npy without --grid or --trajectory", param_hint=hint)


def progress_bar(quiet, description):
    """A rich progress bar on stderr (a no-op context when quiet)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=quiet, transient=False)


@click.command()
@click.option("--model", type=click.Path(dir_okay=False, path_type=Path), default=None, help="ONNX model (default: the shipped one).")
@click.option("--scheduler-config", type=click.Path(dir_okay=False, path_type=Path), default=None, help="diffusers scheduler_config.json overriding the model's schedule.")
@click.option("--backend", default="auto", show_default=True, help="auto, ort-cpu, ort-cuda, ort-tensorrt or tensorrt.")
@click.option("--steps", type=int, default=50, show_default=True, help="Sampling steps (1..num_train_timesteps).")
@click.option("--method", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM eta (0 = deterministic).")
@click.option("--n", "n", type=int, default=16, show_default=True, help="Number of images.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Image i uses seed + i.")
@click.option("--class", "classes", multiple=True, help="Class label (repeatable; cycled over the images) or 'all'.")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance scale (needs --class).")
@click.option("--spacing", type=click.Choice(SPACINGS), default=None, help="Timestep spacing (default: the model's).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples"), show_default=True, help="Output folder (NNNNN.png per image + manifest.jsonl; same-named files are replaced).")
@click.option("--grid", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write all images as one grid PNG.")
@click.option("--format", "fmt", type=click.Choice(["png", "npy"]), default="png", show_default=True)
@click.option("--trajectory", type=int, default=0, help="Every K steps snapshot x_t and predicted x0; one strip PNG per image.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: physical cores).")
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def sample(model, scheduler_config, backend, steps, method, eta, n, batch_size, seed, classes, guidance, spacing,
           out, grid, fmt, trajectory, threads, quiet):
    """Generate images with a model (default: the shipped one)."""
    from ddengine.output import OutputError, check_writable_dir
    from ddengine.sampler import InvalidParameterError

    sampler = open_sampler(model, scheduler_config, backend, threads)
    try:
        request = sampler.request(n, steps, method, eta, seed, None, parse_classes(classes, sampler.spec, n) if n > 0 else None,
                                  guidance, batch_size, spacing, trajectory or False)
    except InvalidParameterError as err:
        raise click.UsageError(str(err)) from None
    make_plan_or_fail(sampler, request)
    check_png_channels(sampler.spec.channels, fmt, grid, trajectory)
    try:
        check_writable_dir(out)
        if grid is not None:
            check_writable_dir(grid.parent)
    except OutputError as err:
        raise click.UsageError(str(err)) from None
    params = dict(model=str(sampler.model.path), model_sha256=sampler.model.sha256, backend=sampler.backend.name,
                  scheduler_config=str(scheduler_config) if scheduler_config else None, steps=steps, method=method,
                  eta=eta, guidance=guidance, spacing=spacing or sampler.spec.scheduler.get("timestep_spacing"),
                  batch_size=batch_size, n=n, format=fmt, trajectory=trajectory or None)
    try:
        failed = run_and_write(sampler, request, out, grid, fmt, params, quiet)
    except (OSError, RuntimeError) as err:  # disk full, backend failure: what is done so far stays listed
        click.echo(f"Error: sampling stopped: {err}; finished images are listed in {out / 'manifest.jsonl'}", err=True)
        sys.exit(1)
    if failed:
        click.echo(f"{failed} of {n} images failed (non-finite values); see {out / 'manifest.jsonl'}", err=True)
        sys.exit(1)
    if not quiet:
        click.echo(f"wrote {n} images to {out}" + (f" and grid {grid}" if grid else ""), err=True)


def run_and_write(sampler, request, out, grid_path, fmt, params, quiet):
    """Sample chunk by chunk, writing each image and the manifest as soon as its chunk is done; return #failed."""
    import numpy as np

    import ddengine
    from ddengine.output import Manifest, grid, save_image, trajectory_strip

    manifest = Manifest(out / "manifest.jsonl")
    kept, failed, total = [], 0, request.n * request.steps
    with progress_bar(quiet, "sampling") as bar:
        task = bar.add_task("sampling", total=total)
        for start in range(0, request.n, request.batch_size):
            part = slice(start, min(start + request.batch_size, request.n))
            sub = dataclasses.replace(request, seeds=request.seeds[part],
                                      classes=None if request.classes is None else request.classes[part])
            images, records = sampler.run(sub, progress=lambda done, _t, s=start: bar.update(task, completed=s * request.steps + done))
            for image, record in zip(images, records):
                index = start + record.pop("index")
                strip = record.pop("trajectory", None)
                name = f"{index:05d}.{fmt}"
                if record["status"] == "ok":
                    save_image(out / name, image, fmt)
                    if grid_path is not None:
                        kept.append(image)
                    if strip is not None:
                        save_image(out / f"{index:05d}_trajectory.png", trajectory_strip(strip["x_t"], strip["x0"]))
                else:
                    failed += 1
                manifest.add({"file": name if record["status"] == "ok" else None, "index": index, **record, **params,
                              "ddengine_version": ddengine.__version__})
            manifest.flush()
    if grid_path is not None and kept:
        save_image(grid_path, grid(np.stack(kept)))
    return failed
