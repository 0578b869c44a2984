"""Fashion-MNIST from its IDX .gz files: uint8 28x28 -> float32 [-1, 1] padded to 32x32 with -1."""

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
NUM_CLASSES = 10
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(ValueError):
    """The data set is missing or its files are not valid IDX."""


def data_dir(path=None):
    """The data folder: `path`, else $DDENGINE_DATA, else the Debian package's folder."""
    return Path(path or os.environ.get("DDENGINE_DATA") or DEFAULT_DIR)


def read_idx(path, magic, ndim):
    """Parse one gzip'd IDX file (big-endian header: magic, then one uint32 per dimension)."""
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(
            f"Fashion-MNIST file {path} not found; install it with `{INSTALL_HINT}` or pass --data DIR"
        ) from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable gzip file: {err}") from None
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes is shorter than the {header}-byte IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(f"{path}: IDX magic number 0x{got:08x}, expected 0x{magic:08x}")
    shape = tuple(int.from_bytes(raw[4 * (i + 1) : 4 * (i + 2)], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_uint8(split="train", path=None):
    """Raw images (N, 28, 28) uint8 and labels (N,) int64 of a split ('train' or 'test')."""
    if split not in FILES:
        raise DataError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = data_dir(path)
    if not folder.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {folder} does not exist; install it with `{INSTALL_HINT}` or pass --data DIR"
        )
    image_file, label_file = FILES[split]
    images = read_idx(folder / image_file, IMAGES_MAGIC, 3)
    labels = read_idx(folder / label_file, LABELS_MAGIC, 1)
    if len(images) != len(labels):
        raise DataError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{folder / label_file}: label {labels.max()} outside 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


def to_model_range(images, size=32):
    """uint8 (N, h, w) -> float32 (N, 1, size, size) in [-1, 1], centred, padded with -1 (black)."""
    x = images.astype(np.float32) / 127.5 - 1.0
    ph, pw = size - x.shape[1], size - x.shape[2]
    if ph < 0 or pw < 0:
        raise DataError(f"images of {x.shape[1:]} do not fit in {size}x{size}")
    x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), constant_values=-1.0)
    return x[:, None]


def load(split="train", path=None, size=32):
    """Images (N, 1, size, size) float32 in [-1, 1] and labels (N,) int64."""
    images, labels = load_uint8(split, path)
    return to_model_range(images, size), labels
