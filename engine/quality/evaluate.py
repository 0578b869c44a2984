"""Sample quality: FID on the shipped classifier's features (Heusel et al. 2017) and conditional accuracy."""

import importlib.resources
import time
from pathlib import Path

import numpy as np

from ddengine.quality.metrics import accuracy, fid

CLASSIFIER = "models/classifier.onnx"
IMAGE_SHAPE = (32, 32, 1)


class EvaluationError(ValueError):
    """The classifier or the data set is missing or not what evaluation needs."""


def default_classifier_path():
    """The shipped Fashion-MNIST classifier (package `ddengine`, `models/classifier.onnx`)."""
    return Path(str(importlib.resources.files("ddengine").joinpath(CLASSIFIER)))


class FeatureNet:
    """The ONNX classifier: uint8 NHWC images -> (logits, features)."""

    def __init__(self, path=None, threads=None):
        import onnxruntime as ort

        path = Path(path) if path is not None else default_classifier_path()
        if not path.is_file():
            raise EvaluationError(f"classifier {path} not found (train one with `ddengine train-classifier`)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in self.session.get_outputs()]
        if names != ["logits", "features"]:
            raise EvaluationError(f"classifier {path} outputs {names}, expected ['logits', 'features']")

    def __call__(self, images, batch=500):
        """Logits (N, 10) and features (N, D) of uint8 (N, 32, 32, 1) images, scaled as in training ([-1, 1])."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or images.dtype != np.uint8:
            raise EvaluationError(
                f"the classifier takes uint8 images of shape (N, 32, 32, 1), got {images.dtype} {images.shape}"
            )
        x = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        parts = [self.session.run(None, {"image": x[i : i + batch]}) for i in range(0, len(x), batch)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def real_images(split, data_path=None, n=None, seed=0):
    """uint8 (N, 32, 32, 1) Fashion-MNIST images padded as the model sees them, and labels."""
    from ddengine.quality.fashion_mnist import load_uint8, to_model_range
    from ddengine.runtime.sampler import to_uint8

    images, labels = load_uint8(split, data_path)
    if n is not None:
        idx = np.random.default_rng(seed).choice(len(images), size=min(n, len(images)), replace=False)
        images, labels = images[idx], labels[idx]
    return to_uint8(to_model_range(images)), labels


def real_floor(net, test_features, test_accuracy, data_path, n, seed):
    """The real-vs-real row: FID of n training images against the test set, and the classifier's test accuracy."""
    train, _ = real_images("train", data_path, n=n, seed=seed)
    return {
        "guidance": "real (train vs test)",
        "n": len(train),
        "fid": fid(net(train)[1], test_features),
        "accuracy": test_accuracy,
        "failed": 0,
        "seconds": 0.0,
    }


ACCURACY_TARGET = 0.95  # of the classifier's accuracy on real test images


def best_guidance(rows, classifier_accuracy):
    """The sweep's best guidance: the lowest FID among rows with accuracy >= ACCURACY_TARGET x the classifier's,
    else the most accurate row."""
    good = [r for r in rows if r["accuracy"] >= ACCURACY_TARGET * classifier_accuracy]
    return (min(good, key=lambda r: r["fid"]) if good else max(rows, key=lambda r: r["accuracy"]))["guidance"]


def evaluate(sampler, net, test_features, n, steps, guidance, seed, batch_size, method="ddim", progress=None):
    """n class-balanced images (image i has class i % 10) at one guidance (DDIM eta 0 or DDPM); FID and accuracy.

    guidance 0 samples the null class alone and 1 the conditional model alone (one forward each, ddengine.runtime.batch).
    """
    classes = np.arange(n, dtype=np.int64) % 10
    start = time.perf_counter()
    images, records = sampler.sample(
        n,
        steps=steps,
        method=method,
        eta=0.0,
        seed=seed,
        classes=classes,
        guidance=float(guidance),
        batch_size=batch_size,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    failed = sum(r["status"] != "ok" for r in records)
    logits, features = net(images)
    return {
        "guidance": guidance,
        "n": n,
        "steps": steps,
        "method": method,
        "fid": fid(features, test_features),
        "accuracy": accuracy(logits.argmax(1), classes),
        "failed": failed,
        "seconds": seconds,
    }, images
