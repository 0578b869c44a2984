"""`ddengine train`, `ddengine export`, `ddengine train-classifier`: build-time commands (torch imported inside)."""

import math
from pathlib import Path

import click

from ddengine.core.plan import METHODS

BUILD_EXTRA = "pip install torch==2.13.0 && pip install 'ddengine[export]'"


def _fail(message):
    """A usage/input error: Click prints it and exits with code 2."""
    raise click.UsageError(message)


def _require(*modules):
    """Exit 2 naming the extra to install when a build-time dependency (torch, safetensors, ...) is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        _fail(f"this command needs {', '.join(missing)} (build-time dependencies): {BUILD_EXTRA}")


@click.command()
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="runs/default",
    show_default=True,
    help="Folder for checkpoints (last.safetensors).",
)
@click.option(
    "--data",
    "data_path",
    type=click.Path(),
    default=None,
    help="Fashion-MNIST IDX folder (default: /usr/share/datasets/fashion-mnist).",
)
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=5e-4, show_default=True)
@click.option(
    "--p-uncond",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.1,
    show_default=True,
    help="Label dropout: probability of training a batch row on the null class (CFG).",
)
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=0.999, show_default=True)
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine"]),
    default="constant",
    show_default=True,
    help="After warm-up: constant, or cosine decay to 5% of --lr at the last planned step.",
)
@click.option("--base-channels", type=click.IntRange(8), default=32, show_default=True)
@click.option("--channel-mult", default="1,2,2", show_default=True, help="Width multiplier per resolution level.")
@click.option("--num-res-blocks", type=click.IntRange(1), default=1, show_default=True)
@click.option(
    "--schedule",
    "beta_schedule",
    type=click.Choice(["squaredcos_cap_v2", "linear"]),
    default="squaredcos_cap_v2",
    show_default=True,
)
@click.option(
    "--precision",
    type=click.Choice(["bf16", "fp32"]),
    default="bf16",
    show_default=True,
    help="bf16 autocast is about 2x faster on CPU.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-steps",
    type=click.IntRange(1),
    default=None,
    help="Stop after this many optimiser steps (the run is reproducible by step).",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Save and stop after this much wall time.",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="torch CPU threads (1 avoids oversubscription on a shared 2-core box).",
)
@click.option(
    "--resume",
    "resume_from",
    type=click.Path(dir_okay=False),
    default=None,
    help="Continue from a checkpoint (its settings win).",
)
def train(
    out_dir,
    data_path,
    epochs,
    batch_size,
    lr,
    p_uncond,
    ema_decay,
    lr_schedule,
    base_channels,
    channel_mult,
    num_res_blocks,
    beta_schedule,
    precision,
    seed,
    max_steps,
    max_minutes,
    threads,
    resume_from,
):
    """Train the class-conditional U-Net on Fashion-MNIST; EMA weights are what `export` ships."""
    _require("torch", "safetensors", "tqdm")
    import torch

    from ddengine.export import train as trainer
    from ddengine.export.checkpoint import CheckpointError
    from ddengine.nets.unet import UNetConfig
    from ddengine.quality.fashion_mnist import DataError

    try:
        mult = tuple(int(m) for m in channel_mult.split(","))
        model_cfg = UNetConfig(
            base_channels=base_channels,
            channel_mult=mult,
            num_res_blocks=num_res_blocks,
            head_channels=base_channels * mult[-1],
        )
    except ValueError as err:
        _fail(f"bad model shape (--base-channels {base_channels}, --channel-mult {channel_mult!r}): {err}")
    train_cfg = trainer.TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        p_uncond=p_uncond,
        ema_decay=ema_decay,
        lr_schedule=lr_schedule,
        beta_schedule=beta_schedule,
        precision=precision,
        seed=seed,
    )
    torch.set_num_threads(threads)
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(f"cannot create the checkpoint folder {out_dir}: {err}")
    _check_writable(Path(out_dir) / trainer.LAST)
    try:
        loss = trainer.train(
            out_dir,
            model_cfg,
            train_cfg,
            data_path=data_path,
            resume_from=resume_from,
            log=click.echo,
            max_steps=max_steps,
            max_seconds=None if max_minutes is None else 60 * max_minutes,
        )
    except (DataError, CheckpointError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"cannot write checkpoints to {out_dir}: {err}")
    click.echo(f"final loss {loss:.4f}; checkpoint {Path(out_dir) / trainer.LAST}")


@click.command()
@click.argument("checkpoint", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--out",
    "out_path",
    required=True,
    type=click.Path(),
    help="ONNX file to write; for a StableDiffusionPipeline, the MODEL_DIR folder to create.",
)
@click.option(
    "--diffusers",
    "diffusers_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Export a saved diffusers folder instead: a StableDiffusionPipeline (-> a text-to-image MODEL_DIR) or a UNet2DModel.",
)
@click.option(
    "--fp16", is_flag=True, help="Mixed precision: fp16 weights/convs, fp32 I/O, norms, softmax and timestep embedding."
)
@click.option(
    "--recommended-guidance",
    type=float,
    default=None,
    help="Guidance a class-conditional model samples with when a request gives classes but no guidance (1 = no CFG); "
    "stored in the metadata.",
)
@click.option(
    "--recommended-method",
    type=click.Choice(METHODS),
    default=None,
    help="With --recommended-steps: the sampler a request uses when it gives neither (e.g. from bench/bench_steps.py); "
    "stored in the metadata.",
)
@click.option("--recommended-steps", type=click.IntRange(1), default=None, help="See --recommended-method.")
@click.option(
    "--class-names",
    default=None,
    help="Comma-separated name of each class, in label order (the OpenAI endpoint's prompt); stored in the metadata.",
)
@click.option(
    "--scheduler-config",
    "scheduler_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A diffusers scheduler_config.json for a CHECKPOINT: its sampling keys (clip_sample, timestep_spacing, ...) "
    "replace the trained defaults; training keys must match.",
)
@click.option(
    "--height",
    type=int,
    default=None,
    help="StableDiffusionPipeline: image height (default: the U-Net's sample_size x the VAE's scale).",
)
@click.option(
    "--width",
    type=int,
    default=None,
    help="StableDiffusionPipeline: image width (default: the U-Net's sample_size x the VAE's scale).",
)
def export(
    checkpoint,
    out_path,
    diffusers_dir,
    fp16,
    recommended_guidance,
    recommended_method,
    recommended_steps,
    class_names,
    scheduler_file,
    height,
    width,
):
    """Export a training checkpoint (EMA weights), a diffusers UNet2DModel or a StableDiffusionPipeline to ONNX."""
    from ddengine.export.sd_export import is_pipeline_folder

    if (recommended_method is None) != (recommended_steps is None):
        _fail(
            "give --recommended-method and --recommended-steps together, got "
            f"{recommended_method or 'no method'} and {recommended_steps or 'no steps'}"
        )
    metadata = {
        "recommended_guidance": recommended_guidance,
        "recommended_method": recommended_method,
        "recommended_steps": recommended_steps,
        "class_names": None if class_names is None else tuple(n.strip() for n in class_names.split(",")),
    }
    if diffusers_dir and any(v is not None for v in metadata.values()):
        _fail("--recommended-* and --class-names apply to a training CHECKPOINT, not to --diffusers")

    if recommended_guidance is not None and (not math.isfinite(recommended_guidance) or recommended_guidance < 0):
        _fail(f"--recommended-guidance must be a finite number >= 0, got {recommended_guidance}")
    if scheduler_file is not None and diffusers_dir:
        _fail(
            "--scheduler-config applies to a training CHECKPOINT; a diffusers folder brings its own scheduler/ config"
        )
    overrides = None if scheduler_file is None else _scheduler_overrides(scheduler_file)
    if diffusers_dir and checkpoint is None and is_pipeline_folder(diffusers_dir):
        return _export_pipeline(diffusers_dir, Path(out_path), fp16, height, width)
    if height is not None or width is not None:
        _fail(
            "--height/--width apply to StableDiffusionPipeline folders only (--diffusers PIPELINE_DIR with a model_index.json)"
        )
    _require(
        "torch",
        "safetensors",
        "onnxscript",
        *(["diffusers"] if diffusers_dir else []),
        *(["onnxconverter_common"] if fp16 else []),
    )
    from ddengine.core.schedule import SchedulerConfigError
    from ddengine.export.checkpoint import CheckpointError
    from ddengine.export.diffusers_export import DiffusersExportError, export_diffusers
    from ddengine.export.onnx_export import export_checkpoint
    from ddengine.model.spec import ModelSpecError

    if (checkpoint is None) == (diffusers_dir is None):
        _fail("give exactly one of CHECKPOINT or --diffusers DIR")
    _check_writable(out_path)
    _check_outputs_spare_inputs(out_path, {"CHECKPOINT": checkpoint, "--scheduler-config": scheduler_file})
    _report_export(
        lambda: (
            export_diffusers(diffusers_dir, out_path, fp16)
            if diffusers_dir
            else export_checkpoint(checkpoint, out_path, fp16, metadata, overrides)
        ),
        out_path,
        (CheckpointError, DiffusersExportError, ModelSpecError, SchedulerConfigError),
    )


def _scheduler_overrides(path):
    """The keys of a scheduler_config.json, or exit 2 saying why the file cannot be one."""
    from ddengine.model.load import ModelError, read_scheduler_config

    try:
        return read_scheduler_config(path)
    except ModelError as err:
        _fail(f"--scheduler-config: {err}")


def _export_pipeline(folder, out_dir, fp16, height, width):
    """`export --diffusers PIPELINE_DIR -o MODEL_DIR`: every part exported and verified, then MODEL_DIR appears whole."""
    _require(
        "torch", "onnxscript", "diffusers", "transformers", "tokenizers", *(["onnxconverter_common"] if fp16 else [])
    )
    from ddengine.export.diffusers_export import DiffusersExportError
    from ddengine.export.sd_export import PipelineExportError, export_pipeline

    for value, name in ((height, "--height"), (width, "--width")):
        if value is not None and value < 1:
            _fail(f"{name} must be a positive number of pixels, got {value}")
    import os

    from ddengine.files.atomic import OutputError, check_name

    try:
        check_name(out_dir, "-o")
    except OutputError as err:
        _fail(str(err))
    if out_dir.exists() and not out_dir.is_dir():
        _fail(f"-o {out_dir} is a file; a pipeline exports to a folder (MODEL_DIR)")
    parent = out_dir.absolute().parent  # the parts are written next to MODEL_DIR, then renamed into place
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        _fail(f"output folder {parent} {'is not writable' if parent.is_dir() else 'does not exist'}")
    if out_dir.exists() and any(out_dir.iterdir()):
        _fail(f"output folder {out_dir} exists and is not empty; choose a new -o (nothing is overwritten)")
    _report_export(
        lambda: export_pipeline(
            folder, out_dir, fp16=fp16, height=height, width=width, log=lambda m: click.echo(m, err=True)
        ),
        out_dir,
        (PipelineExportError, DiffusersExportError),
    )


def _report_export(write, out, user_errors):
    """Run an export; its verification errors are echoed, a user's mistake or a failed check exits with a message."""
    from ddengine.export.onnx_export import ExportError

    try:
        errors = write()
    except user_errors as err:
        _fail(str(err))
    except ExportError as err:
        raise click.ClickException(f"export failed verification, nothing written: {err}") from None
    except OSError as err:
        _fail(f"cannot write {out}: {err}")
    checks = ", ".join(f"{k} max |ORT - torch| = {v:.2e}" for k, v in errors.items())
    click.echo(f"wrote {out} ({checks})")


def _check_outputs_spare_inputs(out_path, inputs):
    """Exit 2 when the ONNX file or its torch twin (MODEL.safetensors) would be written over an input file."""
    from ddengine.nets.twin import twin_path

    outputs = {"-o": Path(out_path), "its torch twin": twin_path(Path(out_path))}
    if outputs["-o"] == outputs["its torch twin"]:
        _fail(
            f"-o {out_path} names the ONNX file, and MODEL.safetensors is where its torch twin goes; use -o MODEL.onnx"
        )
    for what, output in outputs.items():
        for name, given in inputs.items():
            if given is not None and output.resolve() == Path(given).resolve():
                _fail(
                    f"-o {out_path}: {what} {output} would be written over the input {name} {given}; "
                    "choose another output name"
                )


def _check_writable(path):
    """Fail before any work when the output folder is missing or not writable, or the name too long for it."""
    import os

    from ddengine.files.atomic import OutputError, check_name

    try:
        check_name(path, "-o")
    except OutputError as err:
        _fail(str(err))
    folder = Path(path).parent
    if not folder.is_dir():
        _fail(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        _fail(f"output folder {folder} is not writable")
    if Path(path).is_dir():
        _fail(f"output path {path} is a directory, expected a file")


@click.command()
@click.option(
    "-o",
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    default="engine/models/classifier.onnx",
    show_default=True,
)
@click.option("--data", "data_path", type=click.Path(), default=None, help="Fashion-MNIST IDX folder.")
@click.option("--epochs", type=click.IntRange(1), default=4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
def train_classifier(out_path, data_path, epochs, seed, threads):
    """Train the small CNN used by `ddengine eval` (accuracy and FID features) and export it to ONNX."""
    _require("torch", "onnxscript")
    import torch

    from ddengine.export import classifier
    from ddengine.quality.fashion_mnist import DataError

    _check_writable(out_path)
    torch.set_num_threads(threads)
    try:
        model, acc = classifier.train(data_path, epochs=epochs, seed=seed, log=click.echo)
    except DataError as err:
        _fail(str(err))
    classifier.export(model, out_path, test_accuracy=acc)
    click.echo(f"test accuracy {acc:.4f}; wrote {out_path}")
