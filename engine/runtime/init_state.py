"""Where sampling starts: the seed's noise (text- or class-to-image), the caller's own `latents` (diffusers'
`latents=`), or an image noised to the strength's first step (image-to-image, as diffusers' img2img pipelines:
x = sqrt(abar) x0 + sqrt(1 - abar) z with the engine's Philox z, or the caller's latents as z). With a mask,
inpainting as diffusers' StableDiffusionInpaintPipeline for 4-channel U-Nets: after every step the kept region
(mask 0) is the image noised to the next step's level with the same z, the masked region (1) is the sample's; at
strength 1 it starts from pure noise. A latent model (a text-to-image MODEL_DIR) does all this in latent space: its
image is encoded once per request by the VAE encoder (the posterior's mean times vae_scaling_factor, diffusers'
_encode_vae_image) and its mask taken to the latent size as diffusers' prepare_mask_latents does (encode_init)."""

import base64
import binascii
import io
import numbers
from dataclasses import dataclass, replace

import numpy as np

from ddengine.core.quoting import shown
from ddengine.model.pipeline_spec import REEXPORT

IMAGE_EXPECTED = (
    "a uint8 (H, W, C) or (N, H, W, C) array, a PIL image, PNG/JPEG bytes or their base64, or a list of these"
)
DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
NO_ENCODER = (
    "image= and mask= on a latent text-to-image model need its VAE encoder (vae_encoder.onnx), and this MODEL_DIR "
    f"has none: it was exported before ddengine wrote one; export it again with `{REEXPORT}` (latents= works "
    "without it)"
)


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
class Pixels:
    """A latent model's image and mask as given, uint8 (k, H, W, C) and (j, H, W, 1), until its VAE encoder makes
    latents of them (encode_init)."""

    images: np.ndarray
    masks: np.ndarray | None


@dataclass(frozen=True)
class InitState:
    """A request's start: the distinct images in model range (k, C, H, W) float32 (image i is images[i % k]), their
    masks (j, 1, H, W) of 0/1 (mask i % j), the caller's noise (n, C, H, W); strength as diffusers'. A latent
    model's image and mask wait in `pixels` for its VAE encoder (encode_init)."""

    images: np.ndarray | None
    noise: np.ndarray | None
    strength: float | None
    masks: np.ndarray | None = None
    pixels: Pixels | None = None

    def record(self):
        """What a manifest records of the start."""
        masked = self.masks is not None or (self.pixels is not None and self.pixels.masks is not None)
        return {"strength": self.strength, "latents": self.noise is not None, "inpainting": masked}

    def part(self, images):
        """The Start of the request's images `images` (a slice)."""
        if self.pixels is not None:
            raise InitError("a latent model's image must be encoded before sampling (Parts.encode_start)")
        index = np.arange(images.start, images.stop)
        own = None if self.images is None else self.images[index % len(self.images)]
        noise = None if self.noise is None else self.noise[images]
        if self.masks is None:
            return Start(own, noise)
        masks = self.masks[index % len(self.masks)]
        return Start(None if self.strength == 1 else own, noise, own, masks)


def bind_init(spec, n, image, strength, latents, mask=None):
    """The InitState of a request for a model (None: the seed's noise), every part checked against the model (a
    latent model's image and mask against its VAE encoder, in encode_init)."""
    if image is None and strength is not None:
        raise InitError(f"strength={shown(strength)} needs an image (image-to-image)")
    if image is None and mask is not None:
        raise InitError("mask needs the image it masks (inpainting: image= and mask=)")
    if image is None and latents is None:
        return None
    latent = spec.text_conditional  # a text-to-image MODEL_DIR: x is the VAE's latents
    images = pixels = None
    if image is not None:
        pixels = uint8_images(image)
        if not latent:
            images = _model_range(to_channels(pixels, spec.channels), spec.height, spec.width, spec.value_range)
        if len(pixels) not in (1, n):
            raise InitError(f"give one image or n = {n} images, got {len(pixels)}")
    noise = None if latents is None else _latents(spec, n, latents)
    grey = None if mask is None else _grey_masks(n, mask)
    masks = None if grey is None or latent else _binary(grey, spec.height, spec.width)
    if strength is None and image is not None:
        strength = 1.0 if grey is not None else DEFAULT_STRENGTH  # diffusers' inpainting and img2img defaults
    waiting = Pixels(pixels, grey) if latent and pixels is not None else None  # for encode_init
    return InitState(images, noise, strength, masks, waiting)


def encode_init(init, encoder, batch_size):
    """A latent model's InitState in latent space: its images through `encoder` (engine/text/pipeline.py VaeEncoder,
    None: a folder without one), its masks at the latent size as diffusers' prepare_mask_latents
    (torch.nn.functional.interpolate's default "nearest": latent pixel (i, j) is image pixel (s i, s j))."""
    if init is None or init.pixels is None:
        return init
    if encoder is None:
        raise InitError(NO_ENCODER)
    height, width, channels = encoder.image_shape
    given = _model_range(to_channels(init.pixels.images, channels), height, width, encoder.value_range)
    masks = None
    if init.pixels.masks is not None:
        s = encoder.latent_scale
        masks = np.ascontiguousarray(_binary(init.pixels.masks, height, width)[:, :, ::s, ::s])
    return replace(init, images=encoder.encode(given, batch_size), masks=masks, pixels=None)


def _grey_masks(n, mask):
    """uint8 (j, H, W, 1) masks, grey as Pillow's "L" (diffusers' mask_processor: do_convert_grayscale)."""
    try:
        grey = to_channels(uint8_images(mask), 1)
    except InitError as err:
        raise InitError(str(err).replace("image", "mask", 1)) from None
    if len(grey) not in (1, n):
        raise InitError(f"give one mask or n = {n} masks, got {len(grey)}")
    return grey


def _binary(grey, height, width):
    """0/1 float32 (j, 1, H, W): a pixel is repainted where the mask is >= 50% white (diffusers' binarisation)."""
    if grey.shape[1:3] != (height, width):
        raise InitError(f"mask must be {width}x{height} (the image's size), got {grey.shape[2]}x{grey.shape[1]}")
    return (grey.astype(np.float32) / 255 >= 0.5).astype(np.float32).transpose(0, 3, 1, 2).copy()


def _model_range(images, height, width, value_range):
    """uint8 (k, H, W, C) -> (k, C, H, W) float32 in value_range, at the size the model makes."""
    if images.shape[1:3] != (height, width):
        raise InitError(
            f"image must be {width}x{height} (W x H, the size this model makes), got "
            f"{images.shape[2]}x{images.shape[1]}"
        )
    lo, hi = value_range
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
