"""Writing files atomically (temp file or anonymous file, then rename or link), PNG/npy encoding, image grids."""
import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np


class OutputError(OSError):
    """An output path cannot be written."""


def _umask():
    """The process umask, read without changing it where /proc allows."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
        return umask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp's own is 0o600)
DIR_MODE = 0o777 & ~_umask()  # what mkdir() would give a new folder (mkdtemp's own is 0o700)


def atomic_write_via(path, write):
    """Call write(tmp_path) on a temp file next to `path`, fsync it, then os.replace it in (never a partial file)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path, data):
    """Write bytes to `path` atomically (see atomic_write_via)."""
    atomic_write_via(path, lambda tmp: Path(tmp).write_bytes(data))


def check_writable_dir(folder):
    """Create `folder` if needed and prove a file can be written there; raise OutputError naming it otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ddengine-probe.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OutputError(f"output folder {folder} is not writable: {err.strerror or err}") from None


def encode_png(image):
    """PNG bytes of a uint8 (H, W, C) image with C in {1, 3, 4}."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected a uint8 (H, W, 1|3|4) image, got {image.dtype} {image.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if mode == "L" else image, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def encode_npy(array):
    """.npy bytes of an array."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode(image, fmt="png"):
    """The bytes of one uint8 (H, W, C) image as PNG or .npy."""
    return encode_png(image) if fmt == "png" else encode_npy(image)


def save_image(path, image, fmt="png"):
    """Atomically write one uint8 (H, W, C) image as PNG or .npy."""
    atomic_write(path, encode(image, fmt))


def grid(images, cols=None, pad=2):
    """Tile uint8 (N, H, W, C) images into one (rows*H, cols*W, C) image, `pad` pixels apart (row-major)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y:y + h, x:x + w] = image
    return out


def class_grid(images, classes, pad=2):
    """One row per class (in order of first appearance), its images left to right; one class or none: a square grid."""
    images = np.asarray(images)
    if classes is None or len(set(classes)) < 2:
        return grid(images, pad=pad)
    order = list(dict.fromkeys(int(c) for c in classes))
    rows = [[i for i, c in enumerate(classes) if c == k] for k in order]
    cols = max(len(r) for r in rows)
    blank = np.zeros_like(images[0])
    tiles = [images[r[j]] if j < len(r) else blank for r in rows for j in range(cols)]
    return grid(np.stack(tiles), cols=cols, pad=pad)


def trajectory_strip(x_t, x0, pad=2):
    """Two rows: the snapshots of x_t on top and of predicted x_0 below, uint8 (K, H, W, C) each."""
    x_t, x0 = np.asarray(x_t), np.asarray(x0)
    return grid(np.concatenate([x_t, x0]), cols=len(x_t), pad=pad)
