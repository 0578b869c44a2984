"""The torch twin of an exported U-Net: its EMA weights and config in one safetensors file next to the ONNX file.

`ddengine export` writes MODEL.safetensors beside MODEL.onnx; the bench baselines and the torch-CUDA backend
load it. The tensors are the module's state dict; the metadata key `ddengine_twin` holds {"format": 1,
"model_config": UNetConfig}.
"""
import json
from pathlib import Path

TWIN_KEY = "ddengine_twin"
TWIN_FORMAT = 1
SUFFIX = ".safetensors"


class TwinError(ValueError):
    """The twin file is missing or is not a ddengine U-Net twin."""


def twin_path(model_path):
    """Where the twin of an ONNX model lives: the same name with .safetensors."""
    return Path(model_path).with_suffix(SUFFIX)


def save_twin(path, module):
    """Write `module` (a ddengine.nets.unet.UNet) as a twin file, atomically."""
    from safetensors.torch import save_file

    from ddengine.output import atomic_write_via

    tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    meta = {TWIN_KEY: json.dumps({"format": TWIN_FORMAT, "model_config": json.loads(module.config.to_json())})}
    atomic_write_via(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_twin(path):
    """The UNet of a twin file (eval mode, fp32, CPU); TwinError naming what is wrong otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    from ddengine.nets.unet import UNet, UNetConfig

    path = Path(path)
    if not path.is_file():
        raise TwinError(f"torch twin {path} not found (`ddengine export` writes it next to the ONNX file)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = json.loads((fh.metadata() or {}).get(TWIN_KEY, "null"))
        if not isinstance(header, dict) or header.get("format") != TWIN_FORMAT:
            raise TwinError(f"{path} is not a ddengine U-Net twin (no '{TWIN_KEY}' metadata of format {TWIN_FORMAT})")
        module = UNet(UNetConfig.from_dict(header["model_config"]))
        module.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as err:
        if isinstance(err, TwinError):
            raise
        raise TwinError(f"{path}: not a usable ddengine U-Net twin: {err}") from None
    return module.eval()
