"""Training checkpoints: one safetensors file (weights, EMA weights, AdamW state) + JSON metadata, written atomically."""

import json
from pathlib import Path

from ddengine.files.atomic import atomic_write_via

FORMAT = "ddengine-checkpoint"
FORMAT_VERSION = 1
META_KEY = "ddengine_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or not a ddengine checkpoint."""


def save(path, *, model, ema, optimizer, meta):
    """Write model/EMA weights and optimizer state as tensors; `meta` (JSON-able: config, step, scheduler...) as metadata."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.detach().clone() for k, v in ema.state_dict().items()})
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value.detach().clone()
    header = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, param_groups=opt["param_groups"])
    atomic_write_via(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(header, sort_keys=True)}))


def load(path):
    """Read a checkpoint -> (meta dict, {'model': sd, 'ema': sd, 'optim': optimizer state dict}); clear errors otherwise."""
    from ddengine.nets.twin import read_tagged

    path = Path(path)
    try:
        meta, tensors = read_tagged(path, META_KEY, "checkpoint")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is a safetensors file but not a ddengine checkpoint (no '{META_KEY}' metadata)")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, expected {FORMAT!r} v{FORMAT_VERSION}"
        )
    parts = {"model": {}, "ema": {}, "optim": {}}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind not in parts:
            raise CheckpointError(f"{path}: unexpected tensor {key!r}")
        parts[kind][rest] = value
    if not parts["ema"]:
        raise CheckpointError(f"{path}: checkpoint holds no EMA weights")
    state = {}
    for key, value in parts["optim"].items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    parts["optim"] = {"state": state, "param_groups": meta.pop("param_groups", [])}
    return meta, parts
