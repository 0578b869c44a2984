"""Export a U-Net to a self-describing ONNX file (opset 17, dynamic batch) that verifies itself against torch."""

import logging
import warnings
from pathlib import Path

import numpy as np

from ddengine.files.atomic import atomic_write
from ddengine.model.spec import METADATA_KEY, ModelSpec

from .checkpoint import CheckpointError

OPSET = 17
OPSET_PARTS = 18  # the pipeline parts: the exporter writes opset-18 Split (num_outputs) for diffusers' attention
ATOL_FP32 = 1e-4
EXTERNAL_DATA_BYTES = 1500 * 2**20
INPUTS = ("sample", "timestep", "class_labels")


class ExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the torch model."""


def spec_for(scheduler, channels, height, width, num_classes, text=False):
    """The ModelSpec of a U-Net: class id `num_classes` is the null class when conditional; `text`: an
    encoder_hidden_states input (a text-conditioned latent U-Net)."""
    names = {k: k for k in (INPUTS if num_classes else INPUTS[:2])}
    if text:
        names["encoder_hidden_states"] = "encoder_hidden_states"
    return ModelSpec(
        scheduler=dict(scheduler),
        channels=channels,
        height=height,
        width=width,
        num_classes=num_classes,
        null_class=num_classes if num_classes else None,
        input_names=names,
    )


def random_inputs(spec, n, seed, num_train_timesteps=None):
    """Random (sample, timestep, [class_labels]) numpy inputs for a model described by `spec`."""
    rng = np.random.default_rng(seed)
    T = num_train_timesteps or spec.scheduler.get("num_train_timesteps", 1000)
    feeds = {
        "sample": rng.standard_normal((n, spec.channels, spec.height, spec.width)).astype(np.float32),
        "timestep": rng.integers(0, T, n).astype(np.int64),
    }
    if spec.num_classes:
        feeds["class_labels"] = rng.integers(0, spec.num_classes + 1, n).astype(np.int64)
    return feeds


def to_onnx(module, spec, opset=OPSET):
    """torch.onnx (dynamo exporter) -> ModelProto with a dynamic batch axis, metadata attached, checker-clean."""
    model = trace(module, random_inputs(spec, 2, seed=0), [spec.output_name], {METADATA_KEY: spec.to_json()}, opset)
    check(model)
    return model


def trace(module, feeds, output_names, metadata=None, opset=OPSET):
    """torch.onnx's dynamo exporter on numpy `feeds` (axis 0 dynamic) -> ModelProto with named nodes and metadata."""
    import onnx
    import torch

    args = tuple(torch.from_numpy(v) for v in feeds.values())
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), _quiet():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            args,
            None,
            input_names=list(feeds),
            output_names=list(output_names),
            dynamic_shapes={k: {0: batch} for k in feeds},
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    model = program.model_proto
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    model.producer_name = "ddengine"
    if metadata:
        onnx.helper.set_model_props(model, metadata)
    return model


def export_graph(module, feeds, output_names, path, metadata=None, fp16=False):
    """Trace `module`, optionally to mixed fp16, and save it to `path`: one file, or with external data over 1.5 GB."""
    import onnx

    model = trace(module, feeds, output_names, metadata, OPSET_PARTS)
    if fp16:
        from . import fp16 as mixed

        model = mixed.convert(model)
    path = Path(path)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > EXTERNAL_DATA_BYTES:  # protobuf cannot serialize 2 GB: the weights go next to the graph
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
    del model
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"exported ONNX graph {path.name} fails onnx.checker: {err}") from None


def verify_file(path, module, feeds, atol=None):
    """Max |ORT - torch| of a saved model over random `feeds(n, seed)` (see compare)."""
    return compare(_session(str(path)), module, feeds, atol)


def compare(session, module, feeds, atol=None, batches=(1, 3), seed=1234):
    """Max |ORT - torch| over random inputs at several batch sizes; ExportError above `atol` (None: 2% of the
    output's scale, for fp16 graphs). Returns the error."""
    import torch

    worst = 0.0
    for n in batches:
        inputs = feeds(n, seed + n)
        with torch.no_grad():
            want = module(*(torch.from_numpy(v) for v in inputs.values())).float().numpy()
        got = session.run(None, inputs)[0]
        if got.shape != want.shape:
            raise ExportError(f"ONNX output shape {got.shape} != torch {want.shape} at batch {n}")
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        limit = atol if atol is not None else 2e-2 * max(float(np.abs(want).max()), 1.0)
        if not err <= limit:
            raise ExportError(f"ONNX Runtime differs from torch by {err:.3g} (> {limit:.3g}) at batch {n}")
        worst = max(worst, err)
    return worst


def _session(model):
    """An ONNX Runtime CPU session of a path or serialized bytes, quiet."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class _quiet:
    """Silence torch.onnx's INFO/WARNING logging for the duration of an export."""

    def __enter__(self):
        self.loggers = [
            logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx")
        ]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def check(model):
    """onnx.checker with full shape/type inference; ExportError on failure."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"exported ONNX graph fails onnx.checker: {err}") from None


def run_onnx(model, feeds):
    """Run a ModelProto on ONNX Runtime's CPU provider; returns the first output."""
    return _session(model.SerializeToString()).run(None, feeds)[0]


def verify(model, module, spec, atol):
    """Max |ORT - torch| of an in-memory U-Net ModelProto over random inputs of its spec (see compare)."""
    return compare(_session(model.SerializeToString()), module, lambda n, seed: random_inputs(spec, n, seed), atol)


def export_module(module, spec, out_path, fp16=False, fp16_atol=None):
    """Export, verify (fp32 vs torch <= 1e-4; fp16 vs torch <= fp16_atol) and atomically write `out_path`."""
    model = to_onnx(module, spec)
    errors = {"fp32": verify(model, module, spec, ATOL_FP32)}
    if fp16:
        from . import fp16 as mixed

        model = mixed.convert(model)
        check(model)
        errors["fp16"] = verify(model, module, spec, fp16_atol)
    write_model(model, out_path)
    return errors


def write_model(model, out_path):
    """Serialise atomically (temp file in the same folder, then rename)."""
    data = model.SerializeToString()
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise OSError(f"output folder {out_path.parent} does not exist")
    atomic_write(out_path, data)


def load_checkpoint_module(path):
    """(UNet with EMA weights in eval mode, ModelSpec) from a training checkpoint."""
    from ddengine.nets.unet import UNet, UNetConfig

    from . import checkpoint

    meta, parts = checkpoint.load(path)
    try:
        cfg = UNetConfig.from_dict(meta["model_config"])
        module = UNet(cfg)
        module.load_state_dict(parts["ema"])
        scheduler = meta["scheduler"]
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a usable ddengine U-Net checkpoint: {err}") from None
    spec = spec_for(scheduler, cfg.in_channels, cfg.image_size, cfg.image_size, cfg.num_classes)
    return module.eval(), spec


def export_checkpoint(path, out_path, fp16=False, metadata=None, scheduler_overrides=None):
    """`ddengine export CHECKPOINT -o OUT [--fp16]`: OUT and its torch twin OUT.safetensors; returns the max errors.

    metadata: ModelSpec fields to set (recommended_guidance, recommended_method/steps, class_names); None: unset.
    """
    from dataclasses import replace

    from ddengine.core.schedule import with_sampling_overrides
    from ddengine.nets.twin import save_twin, twin_path

    module, spec = load_checkpoint_module(path)
    spec = replace(spec, **{k: v for k, v in (metadata or {}).items() if v is not None})
    if scheduler_overrides is not None:
        spec = replace(spec, scheduler=with_sampling_overrides(spec.scheduler, scheduler_overrides))
    errors = export_module(module, spec, out_path, fp16=fp16)
    save_twin(twin_path(out_path), module)
    return errors
