"""The `medctl` executable: registers each command module and the global --debug flag."""

from __future__ import annotations

import os

import typer

from medctl import __version__
from medctl.cli import check, config_cmd
from medctl.cli.common import show_library_messages

app = typer.Typer(
    name="medctl",
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


app.add_typer(config_cmd.app, name="config")
app.add_typer(check.app, name="check")


def main() -> None:
    app()
