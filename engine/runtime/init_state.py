"""Where sampling starts: the seed's noise (text- or class-to-image), the caller's own `latents` (diffusers'
`latents=`), or an image noised to the strength's first step (image-to-image, as diffusers' img2img pipelines:
x = sqrt(abar) x0 + sqrt(1 - abar) z with the engine's Philox z, or the caller's latents as z). With a mask,
inpainting as diffusers' StableDiffusionInpaintPipeline for 4-channel U-Nets: after every step the kept region
(mask 0) is the image noised to the next step's level with the same z, the masked region (1) is the sample's; at
strength 1 it starts from pure noise."""

import base64
import binascii
import io
import numbers
from dataclasses import dataclass

import numpy as np

from ddengine.core.quoting import shown

IMAGE_EXPECTED = (
    "a uint8 (H, W, C) or (N, H, W, C) array, a PIL image, PNG/JPEG bytes or their base64, or a list of these"
)
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default


class InitError(ValueError):
    """An image, strength or latents that cannot start sampling (the message names expected and given)."""


def uint8_images(value):
    """(k, H, W, C) uint8 from IMAGE_EXPECTED's forms."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise InitError(f"image must be {IMAGE_EXPECTED}, got an empty list")
        parts = [uint8_images(v) for v in value]
        if len({p.shape[1:] for p in parts}) != 1:
            raise InitError(f"the images of a list must share one shape, got {sorted({p.shape[1:] for p in parts})}")
        return np.concatenate(parts)
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InitError("image given as a string must be base64 of a PNG or JPEG file") from None
    if isinstance(value, (bytes, bytearray)):
        value = _decode(bytes(value))
    if type(value).__module__.startswith("PIL."):
        value = np.asarray(value)
    array = np.asarray(value) if isinstance(value, np.ndarray) else None
    if array is None or array.dtype != np.uint8 or array.ndim not in (2, 3, 4):
        raise InitError(f"image must be {IMAGE_EXPECTED}, got {_describe(value)}")
    if array.ndim == 2:
        array = array[:, :, None]
    return array[None] if array.ndim == 3 else array


def _decode(data):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.load()
            return np.asarray(picture.convert("RGBA" if picture.mode in ("RGBA", "LA", "P") else picture.mode))
    except UnidentifiedImageError:
        raise InitError(
            f"image bytes are not a readable PNG or JPEG file ({len(data)} bytes in no known format)"
        ) from None
    except OSError as err:
        raise InitError(f"image bytes are not a readable PNG or JPEG file: {err}") from None


def _describe(value):
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    return shown(value) if isinstance(value, (numbers.Number, str)) else type(value).__name__


def to_channels(images, channels):
    """uint8 images with `channels` channels: grey <-> RGB as Pillow converts (ITU-R 601-2 luma, its integer
    rounding), alpha dropped."""
    have = images.shape[-1]
    if have == channels:
        return images
    rgb = images[..., :3] if have >= 3 else np.repeat(images[..., :1], 3, axis=-1)
    if channels == 3:
        return rgb
    if channels == 1:
        r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
        return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]  # Pillow's "L"
    raise InitError(f"a {channels}-channel model takes images of {channels} channels, got {have}")


@dataclass(frozen=True)
class Start:
    """The start of some images (ImageBatch.admit): the images to noise (None: pure noise), the caller's noise
    (None: the seeds'), and for inpainting the known images and their masks (1 = repaint), each (k, ...) or None."""

    images: np.ndarray | None = None
    noise: np.ndarray | None = None
    known: np.ndarray | None = None
    masks: np.ndarray | None = None


@dataclass(frozen=True)
class InitState:
    """A request's start: the distinct images in model range (k, C, H, W) float32 (image i is images[i % k]), their
    masks (j, 1, H, W) of 0/1 (mask i % j), the caller's noise (n, C, H, W); strength as diffusers'."""

    images: np.ndarray | None
    noise: np.ndarray | None
    strength: float | None
    masks: np.ndarray | None = None

    def record(self):
        """What a manifest records of the start."""
        return {"strength": self.strength, "latents": self.noise is not None, "inpainting": self.masks is not None}

    def part(self, images):
        """The Start of the request's images `images` (a slice)."""
        index = np.arange(images.start, images.stop)
        own = None if self.images is None else self.images[index % len(self.images)]
        noise = None if self.noise is None else self.noise[images]
        if self.masks is None:
            return Start(own, noise)
        masks = self.masks[index % len(self.masks)]
        return Start(None if self.strength == 1 else own, noise, own, masks)


def bind_init(spec, n, image, strength, latents, mask=None):
    """The InitState of a request for a model (None: the seed's noise), every part checked against the model."""
    if image is None and strength is not None:
        raise InitError(f"strength={shown(strength)} needs an image (image-to-image)")
    if image is None and mask is not None:
        raise InitError("mask needs the image it masks (inpainting: image= and mask=)")
    if image is None and latents is None:
        return None
    images = None
    if image is not None:
        if spec.text_conditional:
            raise InitError(
                "image-to-image on a latent text-to-image model needs its VAE encoder, which MODEL_DIR folders do not "
                "ship yet; pass latents instead"
            )
        images = _model_range(spec, to_channels(uint8_images(image), spec.channels))
        if len(images) not in (1, n):
            raise InitError(f"give one image or n = {n} images, got {len(images)}")
    noise = None if latents is None else _latents(spec, n, latents)
    masks = None if mask is None else _masks(spec, n, mask)
    if strength is None and image is not None:
        strength = 1.0 if masks is not None else DEFAULT_STRENGTH  # diffusers' inpainting and img2img defaults
    return InitState(images, noise, strength, masks)


def _masks(spec, n, mask):
    """0/1 float32 (j, 1, H, W): a pixel is repainted where the mask is >= 50% white (diffusers' binarisation)."""
    try:
        grey = to_channels(uint8_images(mask), 1)
    except InitError as err:
        raise InitError(str(err).replace("image", "mask", 1)) from None
    if grey.shape[1:3] != (spec.height, spec.width):
        raise InitError(
            f"mask must be {spec.width}x{spec.height} (the image's size), got {grey.shape[2]}x{grey.shape[1]}"
        )
    if len(grey) not in (1, n):
        raise InitError(f"give one mask or n = {n} masks, got {len(grey)}")
    return (grey.astype(np.float32) / 255 >= 0.5).astype(np.float32).transpose(0, 3, 1, 2).copy()


def _model_range(spec, images):
    want = (spec.height, spec.width)
    if images.shape[1:3] != want:
        raise InitError(
            f"image must be {spec.width}x{spec.height} (W x H, the size this model makes), got "
            f"{images.shape[2]}x{images.shape[1]}"
        )
    lo, hi = spec.value_range
    return (lo + (hi - lo) * images.astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2).copy()


def _latents(spec, n, latents):
    array = np.asarray(latents, dtype=np.float32) if isinstance(latents, (np.ndarray, list)) else None
    want = (n, *spec.image_shape)
    if array is None or array.shape not in (want, spec.image_shape if n == 1 else want):
        raise InitError(f"latents must be a float array of shape {want}, got {_describe(latents)}")
    if not np.isfinite(array).all():
        raise InitError("latents must be finite numbers")
    return array.reshape(want)


def start_step(steps, strength):
    """diffusers' img2img get_timesteps: the index of the first of `steps` that runs at `strength`."""
    return max(steps - min(int(steps * strength), steps), 0)
