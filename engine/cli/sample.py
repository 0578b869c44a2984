"""`ddengine sample`: generate images into a folder (one file per image + manifest.jsonl), optionally a grid.

Exit codes: 0 all images fine, 1 some images non-finite (recorded, not written) or a write failed, 2 bad usage
or input (nothing written), 128 + N stopped by signal N (130: Ctrl-C) with every finished image listed.
"""

import sys
from pathlib import Path

import click
import numpy as np

from ddengine.cli.common import (
    EXIT_FAILED,
    Interrupted,
    StopOnSignal,
    exit_interrupted,
    model_options,
    open_sampler,
    param_option,
    progress_bar,
    schedule_options,
    usage_errors,
)


def parse_classes(values):
    """--class values -> None, one int, a list of ints (cycled over the images) or "all"."""
    if not values:
        return None
    if "all" in values:
        if len(values) > 1:
            raise click.BadParameter(
                f"'all' cannot be combined with other classes, got {list(values)}", param_hint="--class"
            )
        return "all"
    try:
        return [int(v) for v in values]
    except ValueError:
        raise click.BadParameter(f"expected integers or 'all', got {list(values)}", param_hint="--class") from None


def check_png_channels(channels, fmt, grid, trajectory):
    """PNG outputs (images, --grid, --trajectory strips) need 1, 3 or 4 channels."""
    if channels in (1, 3, 4):
        return
    for used, hint in ((fmt == "png", "--format"), (grid is not None, "--grid"), (bool(trajectory), "--trajectory")):
        if used:
            raise click.BadParameter(
                f"PNG needs 1, 3 or 4 channels, the model makes {channels}; "
                "use --format npy without --grid or --trajectory",
                param_hint=hint,
            )


@click.command()
@model_options
@schedule_options
@param_option("n", "--n", type=int, default=16)  # the CLI writes a folder: 16 by default, the API and HTTP 1
@click.option(
    "--batch-size", type=int, default=16, show_default=True, help="Images per forward (results do not depend on it)."
)
@param_option("seed", "--seed", type=int)
@param_option(
    "classes",
    "--class",
    multiple=True,
    default=(),
    show_default=False,
    help="Class label (repeatable; cycled over the images) or 'all'.",
)
@param_option(
    "prompt",
    "--prompt",
    multiple=True,
    default=(),
    show_default=False,
    help="Text-to-image models (a MODEL_DIR): the prompt (repeatable; cycled over the images).",
)
@param_option("negative_prompt", "--negative-prompt", multiple=True, default=(), show_default=False)
@param_option("guidance", "--guidance", type=float)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Image-to-image: a PNG/JPEG at the model's size to start from (repeatable: cycled over the images).",
)
@click.option(
    "--mask",
    "masks",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Inpainting, with --image: white pixels are repainted, black kept (repeatable: cycled over the images).",
)
@param_option("strength", "--strength", type=float)
@click.option(
    "--height", type=int, default=None, help="Image height in pixels: must be the size the model was exported for."
)
@click.option(
    "--width", type=int, default=None, help="Image width in pixels: must be the size the model was exported for."
)
@click.option(
    "--out",
    type=click.Path(path_type=str),
    callback=lambda ctx, param, value: folder_name(value),
    default="samples",
    show_default=True,
    help="Output folder: NNNNN.png per image + manifest.jsonl.",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an earlier run in --out (removes the files its manifest lists)."
)
@click.option(
    "--grid",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write all images as one PNG: a row per class when there are several.",
)
@click.option("--format", "fmt", type=click.Choice(["png", "npy"]), default="png", show_default=True)
@click.option(
    "--trajectory", type=int, default=0, help="Every K steps snapshot x_t and predicted x0; one strip PNG per image."
)
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
def sample(
    model,
    scheduler_config,
    backend,
    precision,
    threads,
    steps,
    method,
    eta,
    spacing,
    n,
    batch_size,
    seed,
    classes,
    prompt,
    negative_prompt,
    guidance,
    images,
    masks,
    strength,
    height,
    width,
    out,
    overwrite,
    grid,
    fmt,
    trajectory,
    quiet,
):
    """Generate images with a model: an ONNX file (default: the shipped one) or a text-to-image MODEL_DIR."""
    from ddengine.runtime.capacity import available_memory, human_bytes
    from ddengine.runtime.outdir import OutputFolder, check_space
    from ddengine.runtime.params import SamplingParams

    check_output_names(out, grid)
    check_inputs_outside((*images, *masks), out, overwrite)
    params = usage_errors(
        SamplingParams.build,
        n=n,
        steps=steps,
        method=method,
        eta=eta,
        seed=seed,
        classes=parse_classes(classes),
        guidance=guidance,
        spacing=spacing,
        prompt=list(prompt) or None,
        negative_prompt=list(negative_prompt) or None,
        image=[path.read_bytes() for path in images] or None,
        mask=[path.read_bytes() for path in masks] or None,
        strength=strength,
    )
    sampler = open_sampler(model, scheduler_config, backend, threads, precision)
    check_size(sampler, height, width)
    request = usage_errors(sampler.request, params, batch_size=batch_size, trajectory=trajectory or False)
    check_png_channels(sampler.image_shape[2], fmt, grid, trajectory)
    kept = request.n * int(np.prod(sampler.image_shape)) if grid is not None else 0
    free = available_memory()
    if free is not None and kept > free:
        raise click.UsageError(
            f"--grid keeps all {request.n} images in memory ({human_bytes(kept)}); this machine has "
            f"{human_bytes(free)} available: sample fewer images or drop --grid"
        )
    if grid is not None and not (grid.resolve().parent.is_dir() or grid.resolve().parent == out.resolve()):
        raise click.UsageError(f"--grid {grid}: folder {grid.parent} does not exist (only --out is created)")
    usage_errors(check_space, out, request.n, int(np.prod(sampler.image_shape)) * (1 if fmt == "png" else 4))
    folder = usage_errors(OutputFolder, out, overwrite, grid)
    with StopOnSignal() as stop:
        try:
            failed = write_run(sampler, request, folder, grid, fmt, quiet, stop)
        except Interrupted as err:
            listed = folder.manifest_path if folder.has_manifest else "no manifest (none finished)"  # before close()
            folder.close()
            exit_interrupted(err, f"stopped: {folder.files} image file(s) written, each listed in {listed}")
        except (OSError, RuntimeError) as err:  # disk full, backend failure: what is done so far stays listed
            where = (
                f"the {folder.files} finished image file(s) are listed in {folder.manifest_path}"
                if folder.has_manifest
                else "no image was finished"
            )  # before close(), which forgets the manifest
            folder.close()
            click.echo(f"Error: sampling stopped: {err}; {where}", err=True)
            sys.exit(EXIT_FAILED)
    folder.close()
    if failed:
        click.echo(f"{failed} of {request.n} images failed (non-finite values); see {folder.manifest_path}", err=True)
        sys.exit(EXIT_FAILED)
    if not quiet:
        click.echo(f"wrote {request.n} images to {out}" + (f" and grid {grid}" if grid else ""), err=True)


def folder_name(value):
    """--out as a Path; an empty name is refused (it would mean the current folder)."""
    if not value.strip():
        raise click.BadParameter("expected a folder name, got an empty one", param_hint="--out")
    return Path(value)


def check_output_names(out, grid):
    """--out and --grid fit the file system, and --grid's extension names an image format (checked before anything
    is loaded)."""
    from ddengine.files.atomic import OutputError, check_name
    from ddengine.runtime.output import image_format

    for path, hint in ((out, "--out"), (grid, "--grid")):
        try:
            if path is not None:
                check_name(path, hint)
        except OutputError as err:
            raise click.BadParameter(str(err), param_hint=hint) from None
    if grid is not None:
        try:
            image_format(grid)
        except OutputError as err:
            raise click.BadParameter(str(err), param_hint="--grid") from None


def check_size(sampler, height, width):
    """--height/--width, when given, must be the image size the model was exported for (its graphs are static)."""
    for value, name in ((height, "--height"), (width, "--width")):
        if value is not None and value < 1:
            raise click.BadParameter(f"expected a positive number of pixels, got {value}", param_hint=name)
    h, w, _ = sampler.image_shape
    if (height is None or height == h) and (width is None or width == w):
        return
    given, scale, spec = f"{height or h}x{width or w}", sampler.parts.decoder.latent_scale, sampler.spec
    if scale == 1:
        raise click.UsageError(f"--height/--width ask for {given} images; this model makes {h}x{w} images only")
    raise click.UsageError(
        f"--height/--width ask for {given} images; this model was exported for {h}x{w} "
        f"(latents {spec.height}x{spec.width} times the VAE's scale {scale}); export another size with "
        "`ddengine export --diffusers PIPELINE_DIR -o MODEL_DIR --height H --width W`"
    )


def check_inputs_outside(images, out, overwrite):
    """--overwrite replaces a run's files in --out: an --image there could be one of them."""
    inside = [p for p in images if out.resolve() in p.resolve().parents]
    if inside and overwrite:
        raise click.UsageError(
            f"--image {inside[0]} lies in --out {out}, which --overwrite may clear; copy it out first"
        )


def write_run(sampler, request, folder, grid_path, fmt, quiet, stop):
    """Sample chunk by chunk; each image file lands, then its manifest line. Returns the number of failed images."""
    from ddengine.runtime.output import class_grid, encode, encode_png, image_format, trajectory_strip

    kept, kept_classes, failed = [], [], 0
    with progress_bar(quiet, "steps") as bar:  # per image: its model evaluations (PLMS: steps + 1)
        task = bar.add_task("sampling", total=request.n * len(sampler.plan(request)), images=f"0/{request.n} images")

        def progress(done, total):
            stop.check()
            bar.update(task, completed=done)

        for chunk in sampler.chunks(request, progress=progress):
            bar.update(task, images=f"{chunk.records[-1]['index'] + 1}/{request.n} images")
            for image, record in zip(chunk.images, chunk.records):
                stop.check()
                index, strip = record["index"], record.pop("trajectory", None)
                files = []
                if record["status"] == "ok":
                    unit = {f"{index:05d}.{fmt}": encode(image, fmt)}
                    if strip is not None:
                        unit[f"{index:05d}_trajectory.png"] = encode(trajectory_strip(strip["x_t"], strip["x0"]))
                    folder.write_together(unit)  # the image and its strip: both on disk or neither
                    files = list(unit)
                    if grid_path is not None:
                        kept.append(image)
                        kept_classes.append(record["class"])
                else:
                    failed += 1
                folder.add(
                    {
                        "file": files[0] if files else None,
                        "trajectory_file": files[1] if len(files) > 1 else None,
                        "format": fmt,
                        **record,
                    },
                    files,
                )
        bar.update(task, completed=request.n * len(sampler.plan(request)))
    if grid_path is not None and kept:
        classes = None if request.classes is None else kept_classes
        picture = class_grid(np.stack(kept), classes, names=sampler.spec.class_names)
        folder.write_grid(grid_path, encode_png(picture, image_format(grid_path)))
    return failed
