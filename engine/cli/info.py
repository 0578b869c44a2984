"""`ddengine info`: a model's spec, the schedule the engine derives from it, and the backends of this machine."""
from pathlib import Path

import click

from ddengine.cli.common import schedule_options, usage_errors


@click.command()
@click.argument("model", type=click.Path(path_type=Path), required=False)
@click.option("--scheduler-config", type=click.Path(path_type=Path), default=None,
              help="diffusers scheduler_config.json overriding the model's schedule.")
@schedule_options
def info(model, scheduler_config, steps, method, eta, spacing):
    """Print a model's spec, the schedule the engine will use, and which backend `auto` picks here."""
    from rich.console import Console
    from rich.table import Table

    from ddengine.coeffs import COLUMNS
    from ddengine.model import load_model
    from ddengine.requests import make_request
    from ddengine.sampler import step_plan
    from ddengine.schedule import SchedulerConfig

    loaded = usage_errors(load_model, model, scheduler_config)
    spec = loaded.spec
    classes = 0 if spec.conditional and spec.null_class is None else None
    request = usage_errors(make_request, spec, 1, steps, method, eta, classes=classes, spacing=spacing)
    plan = usage_errors(step_plan, spec, request)
    console = Console(soft_wrap=True, width=max(Console().width, 140))
    console.print(f"[bold]model[/bold]   {loaded.path}  sha256 {loaded.sha256}")
    console.print(f"[bold]image[/bold]   {spec.channels}x{spec.height}x{spec.width}, value range {list(spec.value_range)}")
    kind = f"conditional, {spec.num_classes} classes, null class {spec.null_class}" if spec.conditional else "unconditional"
    console.print(f"[bold]classes[/bold] {kind}; recommended guidance {spec.recommended_guidance}")
    for role, tensor in spec.io.items():
        console.print(f"[bold]io[/bold]      {role:<22} {tensor.name!r} {tensor.dtype} {list(tensor.shape)}")
    console.print("[bold]scheduler[/bold]")
    for key in sorted(spec.scheduler):
        value = spec.scheduler[key]
        console.print(f"  {key} = {value if not isinstance(value, list) else f'[{len(value)} values]'}")
    unused = SchedulerConfig.unused_keys(spec.scheduler)
    if unused:
        console.print(f"  (not used by DDPM/DDIM: {', '.join(unused)})")
    console.print(f"[bold]plan[/bold]    {method}, {len(plan)} steps, eta {plan.eta}, clip {plan.clip}")
    console.print(f"  timesteps {plan.timesteps.tolist()}")
    table = Table("step", "t", *COLUMNS)
    for i in sorted({0, 1, len(plan) - 2, len(plan) - 1} & set(range(len(plan)))):
        table.add_row(str(i), str(plan.timesteps[i]), *(f"{v:.6g}" for v in plan.coeffs[i]))
    console.print(table)
    print_backends(console, loaded)


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
        console.print("  batch-invariant here: 7 rows with their own timesteps and labels gave, bit for bit, what each gave "
                      "alone; the same request gives bit-identical images whatever the batch size")
    else:
        console.print("  [bold]not batch-invariant here[/bold]: an image can change in its last bits with the batch it "
                      "shares; use --backend ort-cpu for the exact fp32 path")
