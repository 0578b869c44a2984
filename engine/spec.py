"""ModelSpec: what a self-describing ONNX model tells the engine (its `ddengine` metadata entry)."""
import json
from dataclasses import asdict, dataclass, field

METADATA_KEY = "ddengine"
FORMAT_VERSION = 1


class ModelSpecError(ValueError):
    """The model's metadata is missing, malformed, or of an unsupported version."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to sample a model; serialised as JSON under the ONNX metadata key `ddengine`.

    `scheduler` uses diffusers' scheduler_config.json keys (num_train_timesteps, beta_schedule,
    beta_start, beta_end, trained_betas, prediction_type, clip_sample, clip_sample_range,
    timestep_spacing, steps_offset, set_alpha_to_one, variance_type, rescale_betas_zero_snr).
    """

    scheduler: dict
    channels: int
    height: int
    width: int
    value_range: tuple = (-1.0, 1.0)
    num_classes: int = 0  # 0 = unconditional
    null_class: int | None = None  # the class id meaning "no class" (classifier-free guidance)
    timestep_dtype: str = "int64"  # the `timestep` input carries the training timestep index t
    input_names: dict = field(default_factory=lambda: {"sample": "sample", "timestep": "timestep", "class_labels": "class_labels"})
    output_name: str = "out"
    format_version: int = FORMAT_VERSION

    @property
    def conditional(self):
        return self.num_classes > 0

    @property
    def prediction_type(self):
        return self.scheduler.get("prediction_type", "epsilon")

    def to_json(self):
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Parse the metadata entry, naming what is wrong when it cannot be used."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelSpecError(f"'{METADATA_KEY}' metadata is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ModelSpecError(f"'{METADATA_KEY}' metadata must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelSpecError(f"'{METADATA_KEY}' metadata format_version {version!r} is not supported (expected {FORMAT_VERSION})")
        missing = [k for k in ("scheduler", "channels", "height", "width") if k not in data]
        if missing:
            raise ModelSpecError(f"'{METADATA_KEY}' metadata lacks {', '.join(missing)}")
        known = set(cls.__dataclass_fields__)
        data = {k: v for k, v in data.items() if k in known}
        data["value_range"] = tuple(data.get("value_range", (-1.0, 1.0)))
        return cls(**data)
