"""The torch twin of an exported U-Net: its weights and architecture in one safetensors file next to the ONNX file.

`ddengine export` writes MODEL.safetensors beside MODEL.onnx; the bench baselines and the torch-CUDA backend load
it. The tensors are the module's state dict; the metadata key `ddengine_twin` holds {"format": 1, "architecture":
"ddengine-unet" | "diffusers-UNet2DModel", "config": ...}. Every twin is called as forward(sample, timestep,
class_labels) -> model output, the engine's input contract.
"""

import json
from pathlib import Path

from ddengine.files.bounded_json import JSONLimitError, parse_bounded_json

TWIN_KEY = "ddengine_twin"
TWIN_FORMAT = 1
SUFFIX = ".safetensors"
ARCHITECTURES = ("ddengine-unet", "diffusers-UNet2DModel")


class TwinError(ValueError):
    """The twin file is missing or is not a ddengine U-Net twin."""


def twin_path(model_path):
    """Where the twin of an ONNX model lives: the same name with .safetensors."""
    return Path(model_path).with_suffix(SUFFIX)


def save_twin(path, module):
    """Write `module` (a ddengine UNet, or a DiffusersUNet wrapper) as a twin file, atomically."""
    from safetensors.torch import save_file

    from ddengine.files.atomic import atomic_write_via
    from ddengine.nets.diffusers_unet import DiffusersUNet

    if isinstance(module, DiffusersUNet):
        architecture, config, state = "diffusers-UNet2DModel", dict(module.unet.config), module.unet.state_dict()
    else:
        architecture, config, state = "ddengine-unet", json.loads(module.config.to_json()), module.state_dict()
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    meta = {TWIN_KEY: json.dumps({"format": TWIN_FORMAT, "architecture": architecture, "config": config}, default=list)}
    atomic_write_via(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_tagged(path, key, what, hint=""):
    """(the JSON metadata entry `key` of a safetensors file, or None; its tensors); ValueError naming the file
    (`what` it should have been and a `hint`, when it is missing)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    if not Path(path).is_file():
        raise ValueError(f"{what} {path} does not exist or is not a file{hint}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            entry = (fh.metadata() or {}).get(key)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
    try:
        return (None if entry is None else parse_bounded_json(entry, f"'{key}' metadata")), tensors
    except JSONLimitError as err:
        raise ValueError(f"{path}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{path}: its '{key}' metadata is not valid JSON: {err}") from None


def load_twin(path):
    """The module of a twin file (eval mode, fp32, CPU); TwinError naming what is wrong otherwise."""
    path = Path(path)
    try:
        header, tensors = read_tagged(
            path, TWIN_KEY, "torch twin", " (`ddengine export` writes it next to the ONNX file)"
        )
    except ValueError as err:
        raise TwinError(str(err)) from None
    if not isinstance(header, dict) or header.get("format") != TWIN_FORMAT:
        raise TwinError(f"{path} is not a ddengine U-Net twin (no '{TWIN_KEY}' metadata of format {TWIN_FORMAT})")
    if header.get("architecture") not in ARCHITECTURES:
        raise TwinError(
            f"{path}: twin architecture {header.get('architecture')!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    try:
        module = _build(header["architecture"], header["config"])
        target = module.unet if header["architecture"] != "ddengine-unet" else module
        target.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise TwinError(f"{path}: not a usable ddengine U-Net twin: {err}") from None
    return module.eval()


def _build(architecture, config):
    if architecture == "ddengine-unet":
        from ddengine.nets.unet import UNet, UNetConfig

        return UNet(UNetConfig.from_dict(config))
    from diffusers import UNet2DModel

    from ddengine.nets.diffusers_unet import DiffusersUNet

    return DiffusersUNet(UNet2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")}))
