"""`ddengine eval`: FID on classifier features and conditional accuracy of generated images (engine/quality/evaluate.py)."""

import json
from pathlib import Path

import click
import numpy as np

from ddengine.cli.common import PRECISIONS, check_output_files, open_sampler, progress_bar, usage_errors
from ddengine.core.plan import METHODS


@click.command()
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    default=None,
    help="ONNX model (default: the shipped one).",
)
@click.option(
    "--scheduler-config",
    type=click.Path(path_type=Path),
    default=None,
    help="diffusers scheduler_config.json overriding the model's schedule (e.g. clip_sample).",
)
@click.option("--backend", default="auto", show_default=True, help="auto, or a backend `ddengine info` lists.")
@click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, help="The forward's precision."
)
@click.option(
    "--classifier",
    "classifier_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Classifier ONNX (default: the shipped one).",
)
@click.option("--data", "data_path", type=click.Path(), default=None, help="Fashion-MNIST IDX folder.")
@click.option(
    "--n",
    type=click.IntRange(10),
    default=1000,
    show_default=True,
    help="Generated (and real floor) images per guidance.",
)
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True)
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="ddim",
    show_default=True,
    help="The sampler (ddim, ddpm or a solver: dpmpp-2m, dpmpp-3m, unipc, euler, euler-a, plms).",
)
@click.option(
    "--guidance",
    "guidances",
    type=click.FloatRange(0),
    multiple=True,
    default=(0.0, 1.0, 1.5),
    show_default=True,
    help="Repeatable; 0 = unconditional (null class), 1 = conditional.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: physical cores).")
@click.option(
    "--grid",
    "grid_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also save a PNG grid (a row per class, 10 columns) from the last --guidance.",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON."
)
def eval_cmd(
    model_path,
    scheduler_config,
    backend,
    precision,
    classifier_path,
    data_path,
    n,
    steps,
    method,
    guidances,
    seed,
    batch_size,
    threads,
    grid_path,
    json_path,
):
    """FID (classifier features, vs the 10,000 test images) and conditional accuracy, per guidance."""
    from ddengine.files.atomic import atomic_write
    from ddengine.quality.evaluate import (
        IMAGE_SHAPE,
        EvaluationError,
        FeatureNet,
        best_guidance,
        evaluate,
        real_floor,
        real_images,
    )
    from ddengine.quality.fashion_mnist import DataError
    from ddengine.runtime.output import class_grid, image_format, save_image

    check_output_files(**{"--grid": grid_path, "--json": json_path})
    if grid_path is not None:
        usage_errors(image_format, grid_path)
    sampler = open_sampler(model_path, scheduler_config, backend, threads, precision)
    spec = sampler.spec
    if (spec.height, spec.width, spec.channels) != IMAGE_SHAPE or spec.num_classes < 10:
        raise click.UsageError(
            f"eval scores Fashion-MNIST models (1x32x32 images, 10 classes); {sampler.model.path.name} "
            f"makes {spec.channels}x{spec.height}x{spec.width} images with {spec.num_classes} classes"
        )
    try:
        net = FeatureNet(classifier_path, threads)
        test, test_labels = real_images("test", data_path)
        test_logits, test_features = net(test)
        rows = [
            real_floor(net, test_features, float(np.mean(test_logits.argmax(1) == test_labels)), data_path, n, seed)
        ]
    except (DataError, EvaluationError) as err:
        raise click.UsageError(str(err)) from None
    images = None
    with sampler, progress_bar(False, "steps") as bar:
        for g in guidances:
            task = bar.add_task(f"guidance {g:g}", total=n * steps)
            row, images = usage_errors(
                evaluate,
                sampler,
                net,
                test_features,
                n,
                steps,
                g,
                seed,
                batch_size,
                method,
                lambda done, total, task=task: bar.update(task, completed=done),
            )
            rows.append(row)
            bar.console.print(_line(row))
    _table(rows)
    best = best_guidance(rows[1:], rows[0]["accuracy"])
    click.echo(
        f"best guidance {best:g} (lowest FID with accuracy >= 0.95x the classifier's, else the most accurate); "
        f"store it with `ddengine export CHECKPOINT --recommended-guidance {best:g}`"
    )
    if grid_path and images is not None:
        keep = min(len(images), 100)  # 10 per class: image i has class i % 10
        save_image(grid_path, class_grid(images[:keep], list(np.arange(keep) % 10), names=sampler.spec.class_names))
        click.echo(f"wrote {grid_path}")
    if json_path:
        from ddengine.benchmark.harness import machine

        text = json.dumps(
            {
                "model": str(model_path or "default"),
                "model_sha256": sampler.model.sha256,
                "machine": machine(),
                "backend": sampler.backend.name,
                "precision": sampler.backend.precision,
                "steps": steps,
                "method": method,
                "scheduler_config": None if scheduler_config is None else str(scheduler_config),
                "scheduler": sampler.spec.scheduler,
                "best_guidance": best,
                "rows": rows,
            },
            indent=2,
        )
        atomic_write(json_path, text.encode())


def _line(row):
    return (
        f"guidance {row['guidance']}: FID {row['fid']:.3f}, accuracy {row['accuracy']:.3f}, "
        f"failed {row['failed']}, {row['seconds']:.0f} s"
    )


def _table(rows):
    """The results as a Markdown table (the README's format); the real row's accuracy is the classifier's on test."""
    click.echo("| images | N | FID | accuracy |\n|---|---|---|---|")
    for row in rows:
        label = row["guidance"] if isinstance(row["guidance"], str) else f"generated, guidance {row['guidance']:g}"
        click.echo(f"| {label} | {row['n']} | {row['fid']:.3f} | {row['accuracy']:.3f} |")
