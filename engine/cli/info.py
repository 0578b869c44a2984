"""`ddengine info`: a model's spec and the schedule the engine derives from it (timesteps, first/last rows)."""
from pathlib import Path

import click

from ddengine.cli.sample import SPACINGS


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path), required=False)
@click.option("--scheduler-config", type=click.Path(dir_okay=False, path_type=Path), default=None, help="diffusers scheduler_config.json overriding the model's schedule.")
@click.option("--steps", type=int, default=50, show_default=True)
@click.option("--method", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--eta", type=float, default=0.0, show_default=True)
@click.option("--spacing", type=click.Choice(SPACINGS), default=None)
def info(model, scheduler_config, steps, method, eta, spacing):
    """Print a model's spec and the schedule the engine will use."""
    from rich.console import Console
    from rich.table import Table

    from ddengine.coeffs import COLUMNS
    from ddengine.model import ModelError, load_model
    from ddengine.sampler import InvalidParameterError, step_plan

    try:
        loaded = load_model(model, scheduler_config)
    except ModelError as err:
        raise click.UsageError(str(err)) from None
    spec = loaded.spec
    try:
        request = make_request_for_info(spec, steps, method, eta, spacing)
        plan = step_plan(spec, request)
    except (InvalidParameterError, ValueError) as err:
        raise click.UsageError(str(err)) from None
    console = Console(soft_wrap=True, width=max(Console().width, 140))
    console.print(f"[bold]model[/bold]   {loaded.path}  sha256 {loaded.sha256}")
    console.print(f"[bold]image[/bold]   {spec.channels}x{spec.height}x{spec.width}, value range {list(spec.value_range)}")
    kind = f"conditional, {spec.num_classes} classes, null class {spec.null_class}" if spec.conditional else "unconditional"
    console.print(f"[bold]classes[/bold] {kind}")
    console.print(f"[bold]io[/bold]      inputs {spec.input_names}, output {spec.output_name!r}, timestep {spec.timestep_dtype}")
    console.print("[bold]scheduler[/bold]")
    for key in sorted(spec.scheduler):
        value = spec.scheduler[key]
        console.print(f"  {key} = {value if not isinstance(value, list) else f'[{len(value)} values]'}")
    console.print(f"[bold]plan[/bold]    {method}, {len(plan)} steps, eta {plan.eta}, clip {plan.clip}")
    console.print(f"  timesteps {plan.timesteps.tolist()}")
    table = Table("step", "t", *COLUMNS)
    shown = sorted({0, 1, len(plan) - 2, len(plan) - 1} & set(range(len(plan))))
    for i in shown:
        table.add_row(str(i), str(plan.timesteps[i]), *(f"{v:.6g}" for v in plan.coeffs[i]))
    console.print(table)


def make_request_for_info(spec, steps, method, eta, spacing):
    """A one-image request carrying the schedule parameters (validated like `sample`'s)."""
    from ddengine.sampler import make_request

    classes = 0 if spec.conditional and spec.null_class is None else None
    return make_request(spec, 1, steps, method, eta, classes=classes, spacing=spacing)
