"""`ddengine info`: a model's spec, the schedule the engine derives from it, and the backends of this machine."""

from pathlib import Path

import click

from ddengine.cli.common import schedule_options, usage_errors


@click.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)  # an ONNX file or a text-to-image MODEL_DIR
@click.option(
    "--scheduler-config",
    type=click.Path(path_type=Path),
    default=None,
    help="diffusers scheduler_config.json overriding the model's schedule.",
)
@schedule_options
def info(model, scheduler_config, steps, method, eta, spacing):
    """Print a model's spec, the schedule the engine will use, and which backend `auto` picks here."""
    from rich.console import Console

    from ddengine.core.schedule import SchedulerConfig
    from ddengine.runtime.params import DEFAULT_METHOD, DEFAULT_STEPS, SamplingParams
    from ddengine.runtime.parts import step_plan

    console = Console(soft_wrap=True, width=max(Console().width, 140))
    kind = TextModelFolder if model is not None and model.is_dir() else ModelFile
    described = usage_errors(kind, model, scheduler_config)
    loaded = described.unet
    spec = loaded.spec
    classes = 0 if spec.conditional and spec.null_class is None else None
    prompt = "" if spec.text_conditional else None
    params = usage_errors(
        SamplingParams.build, n=1, steps=steps, method=method, eta=eta, classes=classes, spacing=spacing, prompt=prompt
    )
    request = usage_errors(params.bind, spec)
    plan = usage_errors(step_plan, spec, request)
    described.print_parts(console, spec)
    console.print(f"[bold]model[/bold]   {loaded.path}  sha256 {loaded.sha256}")
    console.print(
        f"[bold]{described.x}[/bold]  {spec.channels}x{spec.height}x{spec.width}, value range {list(spec.value_range)}"
    )
    if spec.text_conditional:
        kind = (
            "text-conditioned (prompt embeddings through encoder_hidden_states; the negative prompt is the "
            "unconditional branch)"
        )
    else:
        kind = (
            f"conditional, {spec.num_classes} classes, null class {spec.null_class}"
            if spec.conditional
            else "unconditional"
        )
    console.print(f"[bold]classes[/bold] {kind}; recommended guidance {spec.recommended_guidance}")
    if spec.class_names:
        console.print(f"[bold]names[/bold]   {', '.join(spec.class_names)}")
    console.print(
        f"[bold]recommended[/bold] {spec.recommended_method or DEFAULT_METHOD}, "
        f"{spec.recommended_steps or DEFAULT_STEPS} steps{'' if spec.recommended_method else ' (the defaults)'}"
    )
    for role, tensor in spec.io.items():
        console.print(f"[bold]io[/bold]      {role:<22} {tensor.name!r} {tensor.dtype} {list(tensor.shape)}")
    console.print("[bold]scheduler[/bold]")
    for key in sorted(set(spec.scheduler) - unread_keys(spec.scheduler)):
        value = spec.scheduler[key]
        console.print(f"  {key} = {value if not isinstance(value, list) else f'[{len(value)} values]'}")
    unused = SchedulerConfig.unused_keys(spec.scheduler)
    if unused:
        console.print(f"  (not read by any method: {', '.join(unused)})")
    console.print(f"[bold]plan[/bold]    {request.method}, {len(plan)} steps, eta {plan.eta}")
    console.print(f"  timesteps {plan.timesteps.tolist()}")
    console.print(plan_table(plan))
    print_backends(console, loaded)


class ModelFile:
    """An ONNX model file (None: the shipped one), loaded: the U-Net is all there is, and x is an image."""

    x = "image"

    def __init__(self, path, scheduler_config=None):
        from ddengine.model.load import load_model

        self.unet = load_model(path, scheduler_config)

    def print_parts(self, console, spec):
        pass


class TextModelFolder:
    """A text-to-image MODEL_DIR, checked as `sample` checks it (engine/text/pipeline.py read_text_model): x is a
    latent the VAE decodes."""

    x = "latents"

    def __init__(self, folder, scheduler_config=None):
        from ddengine.text.pipeline import read_text_model

        self.model = read_text_model(folder, scheduler_config)
        self.unet = self.model.unet

    def print_parts(self, console, spec):
        print_pipeline(console, self.model, spec)


def print_pipeline(console, model, spec):
    """A text-to-image folder: each part, its file and the backend `auto` runs it on; text, latent and image shapes."""
    from rich.markup import escape

    from ddengine.backends import auto_choice
    from ddengine.model.load import read_weightless
    from ddengine.model.pipeline_spec import REEXPORT
    from ddengine.text.parts import part_backend

    folder, pipeline = model.folder, model.spec
    source = pipeline.source
    console.print(
        f"[bold]pipeline[/bold] {folder}  ({source.get('pipeline')}, diffusers {source.get('diffusers')}, "
        f"fp16 {bool(source.get('fp16'))})"
    )
    unet = auto_choice()
    runs = {
        "text_encoder": ("ort-cpu", "fp32", "always: once per distinct prompt, exact"),
        "unet": (unet.name, unet.precision, "--backend"),
        "vae_decoder": (*part_backend("auto"), "--backend, on the CPU"),
        "vae_encoder": (*part_backend("auto"), "--backend, on the CPU; once per image-to-image request"),
        "tokenizer": ("tokenizers", "-", ""),
    }
    for part, (backend, precision, note) in runs.items():
        if not pipeline.has(part):
            console.print(f"  {part:<13} (none: image=/mask= need it; `{REEXPORT}` writes one)")
            continue
        path = pipeline.path(folder, part)
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))  # with its external data
        if part == "tokenizer":
            io = f"  {model.tokenizer.vocabulary} tokens in its vocabulary"
        else:
            graph = read_weightless(path).graph
            io = (
                "  "
                + ", ".join(f"{v.name} {_shape(v)}" for v in graph.input)
                + " -> "
                + ", ".join(f"{v.name} {_shape(v)}" for v in graph.output)
            )
        where = f"  runs on {backend} ({precision}; {note})" if part != "tokenizer" else ""
        console.print(escape(f"  {part:<13} {pipeline.files[part]} ({size / 2**20:.1f} MiB){io}{where}"))
    channels, height, width = pipeline.image_shape(spec)
    console.print(
        f"[bold]text[/bold]     {pipeline.text_length} tokens per prompt (padded and truncated; pad id {pipeline.pad_token_id})"
    )
    console.print(
        f"[bold]shapes[/bold]   latents {spec.channels}x{spec.height}x{spec.width} -> images {channels}x{height}x{width} "
        f"(VAE scale {pipeline.vae_scale}, scaling factor {pipeline.vae_scaling_factor:g}); "
        f"`ddengine sample --height {height} --width {width}`"
    )


def unread_keys(scheduler):
    """Keys whose value this schedule ignores: beta_start/beta_end beside a cosine schedule or trained_betas, and
    clip_sample_range without clip_sample (diffusers' DDPMScheduler/DDIMScheduler semantics)."""
    unread = set()
    if scheduler.get("trained_betas") is not None or scheduler.get("beta_schedule") == "squaredcos_cap_v2":
        unread |= {"beta_start", "beta_end"}
    if not scheduler.get("clip_sample"):
        unread.add("clip_sample_range")
    return unread


def plan_table(plan):
    """The plan's first two and last two rows, one line per coefficient column it uses, with what it means."""
    from rich.table import Table

    from ddengine.core.rows import COLUMNS, MEANINGS

    steps = sorted({0, 1, len(plan) - 2, len(plan) - 1} & set(range(len(plan))))
    table = Table("column", "meaning (docs/math.md)", *(f"step {i}\nt={plan.timesteps[i]}" for i in steps))
    for k, name in enumerate(COLUMNS):
        if (plan.coeffs[:, k] != (-1 if name == "write_d" else 0)).any():  # the columns this plan uses
            table.add_row(name, MEANINGS[name], *(f"{plan.coeffs[i, k]:.6g}" for i in steps))
    return table


def _shape(value):
    """[N, 77] style shape of a graph input or output (symbolic dims by name)."""
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def print_backends(console, model):
    """The backends installed here, what `--backend auto` resolves to and why, and its measured batch invariance."""
    from ddengine.backends import BackendError, auto_choice, available_backends, create_backend
    from ddengine.backends.base import probe_batch_invariance

    console.print(f"[bold]backends[/bold] available here: {', '.join(available_backends())}")
    choice = auto_choice()
    console.print(f"[bold]auto[/bold]     {choice.name} ({choice.precision}): {choice.reason}")
    try:
        backend = create_backend(choice.name, model, precision=choice.precision)
        exact = probe_batch_invariance(backend, model.spec)
        backend.close()
    except BackendError as err:
        console.print(f"  (could not load it to probe batch invariance: {err})")
        return
    if exact:
        console.print(
            "  batch-invariant here: 7 rows with their own timesteps and labels gave, bit for bit, what each gave "
            "alone; the same request gives bit-identical images whatever the batch size"
        )
    else:
        console.print(
            "  [bold]not batch-invariant here[/bold]: an image can change in its last bits with the batch it "
            "shares; use --backend ort-cpu for the exact fp32 path"
        )
