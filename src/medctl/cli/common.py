"""What every command shares: the config option, trailing overrides, the console and error mapping."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.text import Text

from medctl.cli.output import UserLineHandler, err_console
from medctl.cli.output import console as console  # every command prints results through this one
from medctl.config import Config, load_config
from medctl.errors import MedctlError
from medctl.storage import redact_secrets

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (may `extends` another).", show_default=False),
]
OverridesArgument = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as key=value, parsed as TOML: train.lr_head=1e-4", show_default=False),
]

ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue runs/<run.name> from its checkpoints/last.ckpt, with its settings.")
]
ExtendOption = Annotated[
    bool,
    typer.Option(
        "--extend",
        help="With --resume: train on to a larger number of epochs; the cosine lr schedule is re-planned for "
        "the new total from the step the run reached (the lr rises from the floor to where a run of that "
        "length would be, then decays to the floor at the new end).",
    ),
]
OverwriteOption = Annotated[
    bool, typer.Option("--overwrite", help="Delete an earlier run of the same run.name and start afresh.")
]

F = TypeVar("F", bound=Callable[..., Any])


def show_library_messages() -> None:
    """Route the library's ``medctl`` logger to stderr as plain lines, once."""
    logger = logging.getLogger("medctl")
    if not any(isinstance(h, UserLineHandler) for h in logger.handlers):
        handler = UserLineHandler()
        handler.addFilter(_redact_record)
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug_enabled() else logging.INFO)
    logger.propagate = False


def _redact_record(record: logging.LogRecord) -> bool:
    """No log line shows a credential (URL passwords, AWS values): the message is scrubbed in place."""
    record.msg = redact_secrets(record.getMessage())
    record.args = None
    return True


def debug_enabled() -> bool:
    return os.environ.get("MEDCTL_DEBUG", "").lower() in {"1", "true", "yes"}


def handle_errors(fn: F) -> F:
    """Map medctl errors to one red line and their exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedctlError as exc:
            if debug_enabled():
                err_console.print_exception()
            message = redact_secrets(str(exc))
            err_console.print(Text.assemble(("error: ", "bold red"), message), highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]; finished results are kept")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug or an unexpected failure: exit 1, traceback on request
            if debug_enabled():
                err_console.print_exception()
            else:
                err_console.print(
                    Text.assemble(
                        ("failed: ", "bold red"),
                        redact_secrets(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)"),
                    ),
                    highlight=False,
                    soft_wrap=True,
                )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def resolve_config(config: Path | None, overrides: list[str] | None, stages: Iterable[str] = ()) -> Config:
    """The one config loader of every command: the layers (:func:`medctl.config.load_config`), then the
    registry names and the settings of ``stages`` checked against the models they build
    (:func:`medctl.preflight.validate_config`), every problem at once, before any work."""
    from medctl.preflight import registry_problems, validate_config  # torch loads only when needed

    resolved = load_config(config, overrides or [], name_checks=registry_problems)
    return validate_config(resolved, stages, str(config) if config else "config")


def command_line() -> str:
    return " ".join(["medctl", *sys.argv[1:]])
