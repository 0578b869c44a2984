"""Layer `cli` (top): the `ddengine` command, a Click group whose subcommands are imported only when run.

May import every layer, `ddengine.export` too (only in the build-time commands: train, export, build)."""

import importlib
import importlib.util

import click

# command name -> "module:function"; modules load on use so `ddengine --help` never imports torch.
COMMANDS = {
    "sample": ("ddengine.cli.sample:sample", "Generate images with a model (default: the shipped one)."),
    "info": ("ddengine.cli.info:info", "Print a model's spec and the schedule the engine will use."),
    "bench": ("ddengine.cli.bench:bench", "Per-step latency and images/s against baselines."),
    "build": ("ddengine.cli.build:build", "Build a TensorRT engine from an ONNX model."),
    "train": ("ddengine.cli.model:train", "Train a class-conditional U-Net on Fashion-MNIST (needs torch)."),
    "export": (
        "ddengine.cli.model:export",
        "Export a checkpoint, a diffusers UNet2DModel or a StableDiffusionPipeline to ONNX (needs torch).",
    ),
    "train-classifier": ("ddengine.cli.model:train_classifier", "Train the quality-metric classifier (needs torch)."),
    "eval": ("ddengine.cli.eval:eval_cmd", "FID and conditional accuracy of generated images."),
    "serve": (
        "ddengine.cli.serve:serve",
        "Serve images over HTTP with exact step-level batching (needs the serve extra).",
    ),
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand is invoked."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._available(name)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        target, _ = COMMANDS[name]
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx):
        """Run the command; a MemoryError is one line naming what did not fit (numpy says which array), exit 1."""
        try:
            return super().invoke(ctx)
        except MemoryError as err:
            what = f": {err}" if str(err) else ""
            click.echo(f"Error: out of memory{what}; sample fewer images at once (--batch-size, --n)", err=True)
            ctx.exit(1)

    @staticmethod
    def _available(name):
        return importlib.util.find_spec(COMMANDS[name][0].split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ddengine")
def main():
    """ddengine: sample diffusion U-Nets fast, with fused DDPM/DDIM step kernels."""
