"""The `medctl` executable: registers each command module and the global --debug flag."""

from __future__ import annotations

import os

import typer
from typer.core import TyperGroup

from medctl import __version__
from medctl.cli import (
    check,
    config_cmd,
    demo,
    evaluate,
    finetune,
    list_cmd,
    preprocess,
    pretrain,
    saliency,
    sweep,
)
from medctl.cli.common import show_library_messages


class DebugAnywhere(TyperGroup):
    """The root group: ``--debug`` is taken wherever it stands on the line (``medctl sweep -c x --debug``)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)  # after "--", "--debug" is an argument
        if "--debug" in args[:end]:
            args = ["--debug", *(a for a in args[:end] if a != "--debug"), *args[end:]]
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="medctl",
    cls=DebugAnywhere,
    help=(
        "From raw medical scans to explained results.\n\n"
        "Every command takes -c/--config FILE.toml and trailing key=value overrides.\n\n"
        "Start with:  medctl demo"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (or set MEDCTL_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if debug:
        os.environ["MEDCTL_DEBUG"] = "1"
    show_library_messages()


# in the order a user meets them: the demo, the pipeline stages, then the helpers
app.command("demo")(demo.demo_command)
app.command("preprocess")(preprocess.preprocess_command)
app.command("pretrain")(pretrain.pretrain_command)
app.command("finetune")(finetune.finetune_command)
app.command("sweep")(sweep.sweep_command)
app.command("evaluate")(evaluate.evaluate_command)
app.command("saliency")(saliency.saliency_command)
app.add_typer(check.app, name="check")
app.command("list")(list_cmd.list_command)
app.add_typer(config_cmd.app, name="config")


def main() -> None:
    app()
