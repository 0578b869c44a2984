"""Image outputs: PNG/npy encoding and grids (written atomically through ddengine.files.atomic)."""

import io
import math
from pathlib import Path

import numpy as np

from ddengine.files.atomic import OutputError, atomic_write

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}  # a file's extension -> Pillow's


def image_format(path):
    """Pillow's format for an image file named `path`, from its extension; OutputError naming the ones there are."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise OutputError(f"{path}: the extension picks the image format: {', '.join(IMAGE_FORMATS)}; got {suffix!r}")
    return IMAGE_FORMATS[suffix]


def encode_png(image, image_format="PNG", quality=None):
    """PNG (or JPEG, WEBP) bytes of a uint8 (H, W, C) image with C in {1, 3, 4}; quality: JPEG's or lossy WEBP's."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected a uint8 (H, W, 1|3|4) image, got {image.dtype} {image.shape}")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[2]]
    picture = Image.fromarray(image[:, :, 0] if mode == "L" else image, mode=mode)
    if image_format == "JPEG" and mode == "RGBA":
        picture = picture.convert("RGB")  # JPEG has no alpha
    buffer = io.BytesIO()
    options = {
        "JPEG": {"quality": 95 if quality is None else quality},
        "WEBP": {"lossless": True} if quality is None else {"quality": quality},
    }.get(image_format, {})
    picture.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def encode_npy(array):
    """.npy bytes of an array."""
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def encode(image, fmt="png"):
    """The bytes of one uint8 (H, W, C) image as PNG or .npy."""
    return encode_png(image) if fmt == "png" else encode_npy(image)


def save_image(path, image):
    """Atomically write one uint8 (H, W, C) image in the format its extension names (image_format)."""
    atomic_write(path, encode_png(image, image_format(path)))


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
        out[y : y + h, x : x + w] = image
    return out


def class_grid(images, classes, pad=2, names=None):
    """One row per class (in order of first appearance), its images left to right, each row labelled with its class
    name when `names` (the model's class names) is given; one class or none: a square grid."""
    images = np.asarray(images)
    if classes is None or len(set(classes)) < 2:
        return grid(images, pad=pad)
    order = list(dict.fromkeys(int(c) for c in classes))
    rows = [[i for i, c in enumerate(classes) if c == k] for k in order]
    cols = max(len(r) for r in rows)
    blank = np.zeros_like(images[0])
    tiles = [images[r[j]] if j < len(r) else blank for r in rows for j in range(cols)]
    tiled = grid(np.stack(tiles), cols=cols, pad=pad)
    if not names:
        return tiled
    return with_row_labels(tiled, [names[k] if 0 <= k < len(names) else str(k) for k in order], images.shape[1] + pad)


def with_row_labels(image, labels, row_height):
    """`image` (uint8 H, W, C) with a margin on the left holding labels[i] beside row i (Pillow's default font)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width = max(int(font.getlength(text)) for text in labels) + 6
    margin = Image.new("L", (width, image.shape[0]), 0)
    draw = ImageDraw.Draw(margin)
    for i, text in enumerate(labels):
        top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
        draw.text((3, 2 + i * row_height + (row_height - (bottom - top)) // 2 - top), text, fill=255, font=font)
    column = np.repeat(np.asarray(margin)[:, :, None], image.shape[2], axis=2)
    if image.shape[2] == 4:
        column[:, :, 3] = 255  # an opaque label column on an RGBA grid
    return np.concatenate([column, image], axis=1)


def trajectory_strip(x_t, x0, pad=2):
    """Two rows: the snapshots of x_t on top and of predicted x_0 below, uint8 (K, H, W, C) each."""
    x_t, x0 = np.asarray(x_t), np.asarray(x0)
    return grid(np.concatenate([x_t, x0]), cols=len(x_t), pad=pad)
