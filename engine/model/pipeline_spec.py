"""PipelineSpec: what a latent text-to-image model folder holds (pipeline.json), written by `ddengine export
--diffusers PIPELINE_DIR -o MODEL_DIR` and read by the runtime (engine/text/pipeline.py).

MODEL_DIR/
  pipeline.json      this spec: parts, tokenizer settings, latent shape, VAE scaling factor
  text_encoder.onnx  input_ids int64 (N, text_length) -> hidden states (N, text_length, D)
  unet.onnx          a ddengine U-Net (its own `ddengine` metadata) with an encoder_hidden_states input
  vae_decoder.onnx   latents (N, C, h, w) / scaling_factor -> image (N, 3, H, W) in [-1, 1]
  vae_encoder.onnx   image (N, 3, H, W) in [-1, 1] -> the VAE posterior's mean (N, C, h, w), unscaled (optional:
                     image-to-image and inpainting; folders exported before it have none)
  tokenizer.json     a `tokenizers` Tokenizer (CLIP BPE)
"""

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ddengine.core.quoting import shown
from ddengine.files.bounded_json import JSONLimitError, read_bounded_json
from ddengine.model.load import ModelError

PIPELINE_FILE = "pipeline.json"
MAX_TEXT_LENGTH = 4096  # tokens per prompt (CLIP: 77); a huge one makes the tokenizer abort the process
FORMAT = "ddengine-pipeline"
FORMAT_VERSION = 1
PARTS = ("text_encoder", "unet", "vae_decoder", "tokenizer")
DEFAULT_FILES = {
    "text_encoder": "text_encoder.onnx",
    "unet": "unet.onnx",
    "vae_decoder": "vae_decoder.onnx",
    "tokenizer": "tokenizer.json",
}
OPTIONAL_FILES = {"vae_encoder": "vae_encoder.onnx"}  # a folder without them samples text-to-image and latents=
REEXPORT = "ddengine export --diffusers PIPELINE_DIR -o MODEL_DIR"


class PipelineSpecError(ModelError):
    """pipeline.json is missing, malformed, or names parts that are not there (a ModelError: the model is unusable)."""


@dataclass(frozen=True)
class PipelineSpec:
    """The pipeline's parts and the settings that join them (diffusers' StableDiffusionPipeline semantics)."""

    text_length: int  # tokens per prompt (CLIP: 77), padded and truncated
    pad_token_id: int
    vae_scaling_factor: float  # latents = scaling_factor * VAE posterior; the decoder divides it back out
    vae_scale: int  # image pixels per latent pixel (8 for Stable Diffusion)
    image_channels: int = 3
    files: dict = field(default_factory=lambda: dict(DEFAULT_FILES))
    source: dict = field(default_factory=dict)  # what it was exported from (class names, versions)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name, most in (("text_length", MAX_TEXT_LENGTH), ("vae_scale", 64), ("image_channels", 4)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= most:
                raise PipelineSpecError(
                    f"{PIPELINE_FILE}: {name} must be an integer in [1, {most}], got {shown(value)}"
                )
        if (
            isinstance(self.pad_token_id, bool)
            or not isinstance(self.pad_token_id, numbers.Integral)
            or self.pad_token_id < 0
        ):
            raise PipelineSpecError(f"{PIPELINE_FILE}: pad_token_id must be an integer >= 0, got {self.pad_token_id!r}")
        s = self.vae_scaling_factor
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s) or not s > 0:
            raise PipelineSpecError(f"{PIPELINE_FILE}: vae_scaling_factor must be a finite number > 0, got {shown(s)}")
        if not isinstance(self.files, dict):
            raise PipelineSpecError(f"{PIPELINE_FILE}: files must map parts to file names, got {shown(self.files)}")
        missing = [p for p in PARTS if p not in self.files]
        if missing:
            raise PipelineSpecError(f"{PIPELINE_FILE}: files lacks {', '.join(missing)} (expected {', '.join(PARTS)})")
        for part in self.parts:
            if not isinstance(self.files[part], str) or not self.files[part]:
                raise PipelineSpecError(
                    f"{PIPELINE_FILE}: files.{part} must be a file name, got {shown(self.files[part])}"
                )

    @property
    def parts(self):
        """The parts this folder has: PARTS, and those of OPTIONAL_FILES its files name."""
        return (*PARTS, *(p for p in OPTIONAL_FILES if p in self.files))

    def has(self, part):
        """Whether the folder has `part` (an optional one may be absent: a folder exported before it existed)."""
        return part in self.parts

    def path(self, folder, part):
        """Where a part is: inside `folder`, always (a name that leads out of it is refused, as external data is)."""
        folder = Path(folder)
        path = folder / self.files[part]
        if not path.resolve().is_relative_to(folder.resolve()):
            raise PipelineSpecError(
                f"{PIPELINE_FILE}: files.{part} = {shown(self.files[part])} leads out of {folder}; every part must be "
                "inside the model folder"
            )
        return path

    def image_shape(self, unet_spec):
        """(channels, height, width) of the decoded images of a U-Net whose latents are unet_spec's."""
        return self.image_channels, unet_spec.height * self.vae_scale, unet_spec.width * self.vae_scale

    def to_json(self):
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def read(cls, folder):
        """The spec of a model folder, with every part checked to exist."""
        path = Path(folder) / PIPELINE_FILE
        try:
            data = read_bounded_json(path, str(path))
        except JSONLimitError as err:
            raise PipelineSpecError(str(err)) from None
        except FileNotFoundError:
            raise PipelineSpecError(
                f"{folder} has no {PIPELINE_FILE}: not a ddengine text-to-image model folder "
                f"(make one with `{REEXPORT}`)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PipelineSpecError(f"{path} is unreadable: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
            raise PipelineSpecError(f"{path} is not a {FORMAT} file of version {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        try:
            spec = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise PipelineSpecError(f"{path}: {err}") from None
        absent = [spec.files[p] for p in spec.parts if not spec.path(folder, p).is_file()]
        if absent:
            raise PipelineSpecError(f"{folder} lacks {', '.join(absent)} named by its {PIPELINE_FILE}")
        return spec
