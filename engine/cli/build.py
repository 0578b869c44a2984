"""`ddengine build MODEL.onnx`: a TensorRT engine and its manifest; `ddengine build MODEL_DIR`: one for a
text-to-image model's U-Net (export/trt_build.py). Each is recorded in MODEL.engines.json next to its ONNX, where
`--backend tensorrt` finds it."""

import shlex
from pathlib import Path

import click

EXIT_MISSING_DEPENDENCY = 2


@click.command("build")
@click.argument("model", type=click.Path(exists=True))
@click.option(
    "-o",
    "--output",
    "engine",
    type=click.Path(),
    default=None,
    help="Engine file to write (default: MODEL with suffix .plan); its manifest is ENGINE.plan.json. "
    "For a MODEL_DIR: the folder for unet.plan (default: MODEL_DIR).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp16", "fp32"]),
    default="fp16",
    show_default=True,
    help="fp16 needs the float16 ONNX of `ddengine export --fp16` (the precision lives in the graph).",
)
@click.option(
    "--batch",
    default="1:8:16",
    show_default=True,
    help="Images per batch as MIN:OPT:MAX (one N = static); doubled for guidance on conditional models.",
)
@click.option(
    "--workspace-gb",
    type=click.FloatRange(min=0, min_open=True),
    default=4.0,
    show_default=True,
    help="TensorRT builder workspace limit in GiB.",
)
@click.option(
    "--timing-cache",
    type=click.Path(dir_okay=False),
    default=None,
    help="Timing cache file, read when present and updated after the build.",
)
@click.option(
    "--hardware-compat",
    type=click.Choice(["none", "ampere+"]),
    default="none",
    show_default=True,
    help="ampere+: one engine for every GPU of compute capability >= 8.0 (may be slower).",
)
@click.option("--force", is_flag=True, help="Rebuild even when a matching engine exists.")
@click.option("--device", type=click.IntRange(min=0), default=0, show_default=True, help="CUDA device ordinal.")
def build(model, engine, precision, batch, workspace_gb, timing_cache, hardware_compat, force, device):
    """Build a TensorRT engine from MODEL.onnx, or for the U-Net of a text-to-image MODEL_DIR (its text encoder and
    VAE decoder run on the CPU: no engine), reused when an engine with the same key exists. The engine is recorded
    in MODEL.engines.json next to the ONNX: `--backend tensorrt` loads it from there; `--backend tensorrt:ENGINE`
    names one."""
    from ddengine.backends.trt import TensorRTMissingError, import_tensorrt

    folder = Path(model).is_dir()
    check_names(model, engine, folder, timing_cache)
    try:
        batch = parse_batch(batch)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--batch'") from None
    try:
        import_tensorrt()
    except TensorRTMissingError as err:
        click.echo(f"Error: {err}", err=True)
        raise SystemExit(EXIT_MISSING_DEPENDENCY) from None
    from ddengine.export.trt_build import CPU_PARTS, BuildConfig, build_engine, build_pipeline

    options = dict(
        precision=precision,
        batch=batch,
        workspace_gb=workspace_gb,
        timing_cache=timing_cache,
        hardware_compat=hardware_compat,
        force=force,
        device=device,
    )
    if folder:
        check_model_dir(model, engine)
    elif engine is not None and Path(engine).is_dir():
        raise click.BadParameter(
            f"{engine} is a folder; for MODEL.onnx give the engine file to write", param_hint="'-o'"
        )
    try:
        results = (
            build_pipeline(model, engine, **options)
            if folder
            else {None: build_engine(BuildConfig(onnx_path=model, engine_path=engine, **options))}
        )
    except (RuntimeError, ValueError, OSError) as err:  # BuildError, ModelError, ManifestError, CudaError, ...
        raise click.ClickException(str(err)) from None
    for part, result in results.items():
        report(part, result, f"{precision}, batch {':'.join(map(str, batch))}")
    if folder:
        click.echo(f"{', '.join(CPU_PARTS)}: no engine (they run on the CPU; `ddengine info {model}` says where)")


def report(part, result, what):
    """What was built or reused, and where it is recorded for `--backend tensorrt` (a warning when it is not)."""
    verb = "reused" if result.reused else "built"
    prefix = f"{part}: " if part else ""
    click.echo(f"{prefix}{verb} {result.engine_path} ({what}); manifest {result.manifest_path}")
    if result.index_path is not None:
        click.echo(f"{prefix}recorded in {result.index_path}: `--backend tensorrt` loads it")
    else:
        click.echo(
            f"Warning: {result.engine_path} is not recorded for `--backend tensorrt` ({result.index_error}); "
            f"load it with `--backend {shlex.quote(f'tensorrt:{result.engine_path}')}`",
            err=True,
        )


def check_names(model, engine, folder, timing_cache):
    """The engine (given by -o or not), its manifest and --timing-cache must fit the file system: exit 2 before any
    work."""
    from ddengine.backends.trt_manifest import manifest_path
    from ddengine.files.atomic import OutputError, check_name

    if folder:
        engine_file = Path(engine if engine is not None else model) / "unet.plan"
    else:
        engine_file = Path(engine) if engine is not None else Path(model).with_suffix(".plan")
    what = "-o" if engine is not None else "the engine (default name)"
    try:
        check_name(engine_file, what)
        check_name(manifest_path(engine_file), f"{what}: its manifest")
        if timing_cache is not None:
            check_name(timing_cache, "--timing-cache")
    except OutputError as err:
        raise click.UsageError(str(err)) from None


def check_model_dir(model, engine_dir):
    """A folder must be a text-to-image MODEL_DIR with every part (exit 2 naming what is missing); -o a folder."""
    from ddengine.model.pipeline_spec import PipelineSpec, PipelineSpecError

    try:
        PipelineSpec.read(model)
    except PipelineSpecError as err:
        raise click.UsageError(str(err)) from None
    if engine_dir is not None and Path(engine_dir).exists() and not Path(engine_dir).is_dir():
        raise click.BadParameter(
            f"{engine_dir} is a file; for a MODEL_DIR give the folder of the engines", param_hint="'-o'"
        )


def parse_batch(text):
    """Lazy wrapper so `ddengine build --help` imports neither onnx nor tensorrt."""
    from ddengine.export.trt_build import parse_batch as parse

    return parse(text)
