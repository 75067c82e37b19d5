"""The `nanorl` command line. Thin: it parses, validates and calls the core; it holds no training logic.

Each command group lives in its own module and adds itself to `app` in `_add_commands`. Modules import
nothing heavy at import time, so `nanorl --help` answers fast.
"""

from __future__ import annotations

import sys
import traceback

import typer

from nanorl import __version__
from nanorl.api import NanorlError
from nanorl.cli.ui import print_error, state

app = typer.Typer(
    name="nanorl",
    help="Train a small GPT from scratch, then teach it to reason with RL (GRPO).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nanorl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state["debug"] = debug


def _add_commands() -> None:
    from nanorl.cli import (
        cloud_cmd,
        config_cmd,
        data_cmd,
        eval_cmd,
        model_cmd,
        pipeline_cmd,
        plugins_cmd,
        runs_cmd,
        tokenizer_cmd,
        train_cmd,
    )
    from nanorl.plugins import get_plugins

    for module in (
        plugins_cmd, config_cmd, model_cmd, tokenizer_cmd, data_cmd, pipeline_cmd, train_cmd, eval_cmd, runs_cmd,
        cloud_cmd,
    ):  # fmt: skip
        module.register(app)
    get_plugins().add_commands(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning NanorlError into one red line and an exit code."""
    if argv is None:
        argv = sys.argv[1:]
    state["debug"] = "--debug" in argv
    try:
        _add_commands()
        app(args=argv, prog_name="nanorl", standalone_mode=True)
    except NanorlError as e:
        if state["debug"]:
            traceback.print_exc()
        print_error(e.message, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print_error("interrupted", "a stage resumes from its last checkpoint when you run the command again")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        if state["debug"]:
            traceback.print_exc()
        print_error(
            f"{type(e).__name__}: {e}",
            "this is a bug in nanorl or a plugin; re-run with --debug for the traceback and report it",
        )
        sys.exit(1)
