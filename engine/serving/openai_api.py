"""OpenAI's images API over the engine: POST /v1/images/generations and /v1/images/edits, as the `openai` SDK's
`images.generate` and `images.edit` call them (an edit's form: image files, an optional mask whose transparent
pixels are the area to repaint, and the generation's fields plus strength).

The body is OpenAI's (prompt, model, n, size, response_format, output_format, output_compression, user, stream,
partial_images, and quality/style/moderation/background, accepted as OpenAI does) plus the engine's options at the
top level, where the SDK's `extra_body` puts them (as vLLM-Omni does): seed, steps, method, guidance,
negative_prompt, eta. It becomes the same SamplingParams as POST /v1/images, so its images are bit-identical to
the native endpoint's and to Sampler.sample's. Errors are OpenAI's shape, {"error": {"message", "type", "param",
"code"}}; overload is 429 with Retry-After (the SDK waits and retries), and a request whose work has started
answers failures with `x-should-retry: false`.
"""

import base64
import io
import json
import time
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ddengine.core.quoting import shown
from ddengine.runtime.params import InvalidParameterError, SamplingParams, describe

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # OpenAI's name -> Pillow's
ENGINE_FIELDS = ("seed", "steps", "method", "guidance", "negative_prompt", "eta")
MAX_PARTIAL_IMAGES = 3  # OpenAI's bound


class OpenAIError(Exception):
    """An error response in OpenAI's shape; `param` names the body field, `retry` False once work has started."""

    def __init__(self, status, message, param=None, code=None, headers=None, retry=True):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {}) | ({} if retry else {"x-should-retry": "false"})

    def body(self):
        kind = "invalid_request_error" if self.status < 500 and self.status != 429 else "server_error"
        kind = "rate_limit_error" if self.status == 429 else kind
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ImageGenerationRequest(BaseModel):
    """The body of POST /v1/images/generations: OpenAI's fields, then the engine's (the SDK's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        description="A class name (class-conditional models, e.g. 'sneaker'; case-insensitive), or the prompt of a "
        "text-to-image model."
    )
    model: str | None = Field(None, description="Accepted and echoed: the server runs one model.")
    n: int | None = Field(1, ge=1, description="Number of images.")
    size: str | None = Field(None, description="'WxH': the model's size only (default and 'auto': the model's).")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (this server serves no files)."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Default png.")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0-100.")
    quality: str | None = Field(None, description="Accepted; the steps field sets the cost.")
    style: str | None = None
    moderation: str | None = None
    background: Literal["opaque", "auto"] | None = Field(None, description="The images are opaque.")
    user: str | None = Field(None, max_length=1000)
    safety_identifier: str | None = Field(None, max_length=1000)
    stream: bool | None = Field(False, description="Server-Sent Events: partial images, then the final one.")
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES, description="Previews when streaming.")
    seed: int | None = Field(None, description="Engine: image i uses seed + i (default 0).")
    steps: int | None = Field(None, description="Engine: sampling steps (default: the model's recommended ones).")
    method: str | None = Field(None, description="Engine: ddim, ddpm, dpmpp-2m, dpmpp-3m, unipc, euler, euler-a, plms.")
    guidance: float | None = Field(None, description="Engine: classifier-free guidance (default: the model's).")
    negative_prompt: str | None = Field(None, description="Engine: text-to-image models.")
    eta: float | None = Field(None, description="Engine: DDIM eta.")


def parse_generation(raw):
    """ImageGenerationRequest from JSON bytes; every problem an OpenAIError 400 naming the field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise OpenAIError(400, f"the body must be a JSON object: {err}") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return validated(ImageGenerationRequest, data)


def validated(model, data):
    """model.model_validate(data), a problem an OpenAIError 400 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(map(str, first["loc"])) or None
        message = describe(err) if first["type"] != "extra_forbidden" else _unknown_field(param)
        raise OpenAIError(400, message, param=param, code="invalid_value") from None


class ImageEditRequest(ImageGenerationRequest):
    """The form fields of POST /v1/images/edits besides the files: the generation's, plus the engine's strength."""

    strength: float | None = Field(
        None, description="Engine: how much of the schedule runs (default 0.8, 1 with a mask)."
    )


async def parse_form(raw, headers):
    """The multipart form in `raw`; malformed, or cut short before its closing boundary (--boundary--): a 400."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def chunks():
        yield raw

    parser, ended = MultiPartParser(headers, chunks()), []
    parser.on_end = lambda: ended.append(True)  # python-multipart calls it at the close delimiter, and only there
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise OpenAIError(400, f"the body must be multipart/form-data: {err.message}") from None
    if not ended:
        await form.close()
        raise OpenAIError(400, "the body must be multipart/form-data: it ends before the form's closing boundary")
    return form


async def parse_edit(raw, headers):
    """(ImageEditRequest, [image bytes], mask bytes or None) of OpenAI's multipart form; problems are 400s."""
    form = await parse_form(raw, headers)
    images = [await f.read() for key in ("image", "image[]") for f in form.getlist(key) if hasattr(f, "read")]
    if not images:
        raise OpenAIError(400, "image is required: one or more PNG/JPEG files (form field image or image[])", "image")
    mask = form.get("mask")
    fields = {k: v for k, v in form.multi_items() if k not in ("image", "image[]", "mask") and isinstance(v, str)}
    body = validated(ImageEditRequest, fields)
    return body, images, None if mask is None or not hasattr(mask, "read") else await mask.read()


def alpha_mask(data):
    """OpenAI's mask (a PNG whose fully transparent pixels are the area to edit) as ours: white = repaint."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as picture:
            if "A" not in picture.getbands() and "transparency" not in picture.info:
                raise OpenAIError(
                    400, "mask must be a PNG with an alpha channel (transparent pixels are the area to edit)", "mask"
                )
            alpha = np.asarray(picture.convert("RGBA"))[:, :, 3]
    except (UnidentifiedImageError, OSError) as err:
        raise OpenAIError(400, f"mask is not a readable PNG: {err}", "mask") from None
    return np.where(alpha < 128, 255, 0).astype(np.uint8)


def _unknown_field(name):
    known = [f for f in ImageGenerationRequest.model_fields]
    return f"unknown field {name!r}; this endpoint takes {', '.join(known)}"


def sampling_params(body, spec, image_shape, images=None, mask=None):
    """The SamplingParams of an OpenAI body for a model (its spec, and the (H, W, C) of the images it makes): the
    prompt as a class name or prompt, the size checked; an edit's images (and mask: inpainting) start the
    sampling."""
    if body.response_format == "url":
        raise OpenAIError(
            400, "response_format 'url' is not served (this server keeps no files); use 'b64_json'", "response_format"
        )
    if body.partial_images and not body.stream:
        raise OpenAIError(400, "partial_images needs stream: true", "partial_images")
    check_size(body.size, image_shape)
    fields = {k: getattr(body, k) for k in ENGINE_FIELDS if getattr(body, k) is not None}
    fields |= prompt_fields(body.prompt, spec)
    if images is not None:
        fields |= {"image": images, "strength": body.strength}
        fields |= {} if mask is None else {"mask": alpha_mask(mask)}
    try:
        return SamplingParams.build(n=body.n, **fields)
    except InvalidParameterError as err:
        raise OpenAIError(400, str(err), _param_of(str(err)), "invalid_value") from None


def check_size(size, image_shape):
    """size: None, 'auto' or the model's own 'WxH' (of its decoded images: a latent model's are the VAE's)."""
    own = size_of(image_shape)
    if size not in (None, "auto", own):
        raise OpenAIError(
            400,
            f"size must be {own!r} (the size this model makes) or 'auto', got {shown(size)}",
            "size",
            "invalid_size",
        )


def prompt_fields(prompt, spec):
    """The SamplingParams fields a prompt stands for: a text model's prompt, or a class model's class by name."""
    if spec.text_conditional:
        return {"prompt": prompt}
    if not spec.conditional:
        if prompt.strip():
            raise OpenAIError(400, f"this model is unconditional: give an empty prompt, got {shown(prompt)}", "prompt")
        return {}
    names = spec.class_names or tuple(str(k) for k in range(spec.num_classes))
    wanted = prompt.strip().casefold()
    for label, name in enumerate(names):
        if wanted in (name.casefold(), str(label)):
            return {"classes": label}
    raise OpenAIError(
        400,
        f"prompt must name one of this model's classes ({', '.join(names)}; case-insensitive, or the class number), "
        f"got {shown(prompt)}",
        "prompt",
        "unknown_class",
    )


def _param_of(message):
    """The body field an engine message is about (it starts with the field's name)."""
    head = message.split(" ", 1)[0].rstrip(":=")
    return head if head in ImageEditRequest.model_fields or head in ("classes", "image", "mask") else None


def encode_images(images, body):
    """OpenAI's `data`: one {"b64_json"} per uint8 image in the body's output_format."""
    from ddengine.runtime.output import encode_png

    fmt, quality = OUTPUT_FORMATS[body.output_format or "png"], body.output_compression
    return [{"b64_json": base64.b64encode(encode_png(image, fmt, quality)).decode("ascii")} for image in images]


def size_of(image_shape):
    """OpenAI's 'WxH' of (H, W, C) images."""
    return f"{image_shape[1]}x{image_shape[0]}"


def response_body(images, body):
    """OpenAI's ImagesResponse of finished images."""
    return {
        "created": int(time.time()),
        "data": encode_images(images, body),
        "background": "opaque",
        "output_format": body.output_format or "png",
        "size": size_of(images.shape[1:]),
    }


USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}


def stream_event(kind, image, body, index=None):
    """One Server-Sent Event of OpenAI's image stream: a partial image (index k) or the completed image."""
    data = {
        "type": f"image_generation.{kind}",
        "b64_json": encode_images([image], body)[0]["b64_json"],
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": body.output_format or "png",
        "quality": "auto",
        "size": size_of(image.shape),
        **({"partial_image_index": index} if kind == "partial_image" else {"usage": USAGE}),
    }
    return sse(data["type"], data)


def sse(event, data):
    """The bytes of one Server-Sent Event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
