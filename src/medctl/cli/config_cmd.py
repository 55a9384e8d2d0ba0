"""`medctl config show`: print the resolved configuration."""

from __future__ import annotations

import typer

from medctl.cli.common import ConfigOption, OverridesArgument, console, handle_errors, resolve_config

app = typer.Typer(help="Inspect configuration.", no_args_is_help=True)


@app.command("show")
@handle_errors
def show(config: ConfigOption = None, overrides: OverridesArgument = None) -> None:
    """Print the resolved TOML (defaults < file chain < MEDCTL_* env < key=value), with every setting of
    the selected pretraining method's table ([pretrain.<method>]).

    Example: medctl config show -c config/finetune/linear_probe.toml train.lr_head=1e-4
    """
    from medctl.pretrain import resolved_pretrain  # torch loads only when this command runs

    resolved = resolve_config(config, overrides)
    complete = resolved.model_copy(update={"pretrain": resolved_pretrain(resolved.pretrain)})
    console.print(complete.to_toml(), highlight=False, markup=False)
