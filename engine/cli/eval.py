"""`ddengine eval`: FID on classifier features and conditional accuracy of generated images (numpy + ONNX Runtime)."""
import importlib.resources
import json
import time
from pathlib import Path

import click
import numpy as np

CLASSIFIER = "models/classifier.onnx"


def default_classifier_path():
    """The shipped Fashion-MNIST classifier (package `ddengine`, `models/classifier.onnx`)."""
    return Path(str(importlib.resources.files("ddengine").joinpath(CLASSIFIER)))


class FeatureNet:
    """The ONNX classifier: uint8 NHWC images -> (logits, features)."""

    def __init__(self, path, threads=None):
        import onnxruntime as ort

        if not Path(path).is_file():
            raise click.UsageError(f"classifier {path} not found (train one with `ddengine train-classifier`)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        if names != ["logits", "features"]:
            raise click.UsageError(f"classifier {path} outputs {names}, expected ['logits', 'features']")

    def __call__(self, images, batch=500):
        """Logits (N, 10) and features (N, D) of uint8 (N, 32, 32, 1) images, scaled as in training ([-1, 1])."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (32, 32, 1) or images.dtype != np.uint8:
            raise click.UsageError(f"the classifier takes uint8 images of shape (N, 32, 32, 1), got {images.dtype} {images.shape}")
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        parts = [self.session.run(None, {"image": x[i:i + batch]}) for i in range(0, len(x), batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def real_images(split, data_path, n=None, seed=0):
    """uint8 (N, 32, 32, 1) Fashion-MNIST images padded as the model sees them, and labels."""
    from ddengine.export.data import DataError, load_uint8, to_model_range, to_uint8

    try:
        images, labels = load_uint8(split, data_path)
    except DataError as err:
        raise click.UsageError(str(err)) from None
    if n is not None:
        idx = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
        images, labels = images[idx], labels[idx]
    return to_uint8(to_model_range(images)), labels


def evaluate(sampler, net, test_features, n, steps, guidance, seed, batch_size):
    """Generate n class-balanced images at one guidance; FID vs the test features and conditional accuracy."""
    from ddengine.metrics import accuracy, fid

    classes = np.arange(n, dtype=np.int64) % 10
    start = time.perf_counter()
    # u + g*(c - u) is the null-class model u at g = 0 and the conditional model c at g = 1: both need one forward, not two.
    asked, g = (None, None) if guidance == 0 else (classes, None if guidance == 1 else float(guidance))
    images, records = sampler.sample(n, steps=steps, method="ddim", eta=0.0, seed=seed, classes=asked, guidance=g, batch_size=batch_size)
    seconds = time.perf_counter() - start
    failed = sum(r["status"] != "ok" for r in records)
    logits, features = net(images)
    return {"guidance": guidance, "n": n, "steps": steps, "fid": fid(features, test_features),
            "accuracy": accuracy(logits.argmax(1), classes), "failed": failed, "seconds": seconds}, images


def save_grid(images, path, columns=10):
    """One row per class (images are ordered i % 10 = class), up to `columns` samples each, as a PNG."""
    from PIL import Image

    from ddengine.output import atomic_write_via

    columns = min(columns, len(images) // 10)
    h, w = images.shape[1:3]
    grid = np.zeros((10 * h, columns * w), dtype=np.uint8)
    for cls in range(10):
        for col in range(columns):
            grid[cls * h:(cls + 1) * h, col * w:(col + 1) * w] = images[cls + 10 * col, :, :, 0]
    atomic_write_via(path, lambda tmp: Image.fromarray(grid, mode="L").save(tmp, format="PNG"))


@click.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False), default=None, help="ONNX model (default: the shipped one).")
@click.option("--classifier", "classifier_path", type=click.Path(dir_okay=False), default=None, help="Classifier ONNX (default: the shipped one).")
@click.option("--data", "data_path", type=click.Path(), default=None, help="Fashion-MNIST IDX folder.")
@click.option("--n", type=click.IntRange(10), default=1000, show_default=True, help="Generated (and real floor) images per guidance.")
@click.option("--steps", type=click.IntRange(1), default=50, show_default=True)
@click.option("--guidance", "guidances", type=click.FloatRange(0), multiple=True, default=(0.0, 1.0, 1.5), show_default=True, help="Repeatable; 0 = unconditional (null class), 1 = conditional.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True)
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="CPU threads (0 = all).")
@click.option("--grid", "grid_path", type=click.Path(dir_okay=False), default=None, help="Also save a PNG grid (a row per class, 10 columns) from the last --guidance.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the results as JSON.")
def eval_cmd(model_path, classifier_path, data_path, n, steps, guidances, seed, batch_size, threads, grid_path, json_path):
    """FID (classifier features, vs the 10,000 test images) and conditional accuracy at 50 DDIM steps."""
    from ddengine.metrics import fid
    from ddengine.sampler import Sampler

    for path in (grid_path, json_path):
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise click.UsageError(f"output folder {Path(path).parent} does not exist")
    net = FeatureNet(classifier_path or default_classifier_path(), threads)
    test, test_labels = real_images("test", data_path)
    test_logits, test_features = net(test)
    train, _ = real_images("train", data_path, n=n, seed=seed)
    rows = [{"guidance": "real (train vs test)", "n": len(train), "fid": fid(net(train)[1], test_features),
             "accuracy": float(np.mean(test_logits.argmax(1) == test_labels)), "failed": 0, "seconds": 0.0}]
    images = None
    with Sampler(model=model_path, threads=threads or None) as sampler:
        for g in guidances:
            row, images = evaluate(sampler, net, test_features, n, steps, g, seed, batch_size)
            rows.append(row)
            click.echo(_line(row))
    _table(rows)
    if grid_path and images is not None:
        save_grid(images, grid_path)
        click.echo(f"wrote {grid_path}")
    if json_path:
        from ddengine.output import atomic_write_via

        text = json.dumps({"model": model_path or "default", "steps": steps, "rows": rows}, indent=2)
        atomic_write_via(json_path, lambda tmp: Path(tmp).write_text(text))


def _line(row):
    return f"guidance {row['guidance']}: FID {row['fid']:.3f}, accuracy {row['accuracy']:.3f}, failed {row['failed']}, {row['seconds']:.0f} s"


def _table(rows):
    """The results as a Markdown table (the README's format); the real row's accuracy is the classifier's on test."""
    click.echo("| images | N | FID | accuracy |\n|---|---|---|---|")
    for row in rows:
        label = row["guidance"] if isinstance(row["guidance"], str) else f"generated, guidance {row['guidance']:g}"
        click.echo(f"| {label} | {row['n']} | {row['fid']:.3f} | {row['accuracy']:.3f} |")
