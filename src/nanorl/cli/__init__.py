"""The `nanorl` command line. Thin: it parses, validates and calls the core; it holds no training logic.

Each command group lives in its own module and adds itself to `app` in `_add_commands`. Modules import
nothing heavy at import time, so `nanorl --help` answers fast.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
import warnings

import typer

from nanorl import __version__
from nanorl.api import NanorlError
from nanorl.cli.ui import print_error, print_warning, state

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


def _debug_first(argv: list[str]) -> list[str]:
    """`--debug` is global: accept it anywhere before `--` (`nanorl config show --debug x=1`) by moving it first."""
    end = argv.index("--") if "--" in argv else len(argv)
    if "--debug" not in argv[:end]:
        return argv
    return ["--debug", *(a for a in argv[:end] if a != "--debug"), *argv[end:]]


def _typer_width(stderr: bool) -> None:
    """Typer's help (on stdout) and usage errors (on stderr) as wide as the rest of the output: ui.PIPE_WIDTH in a
    pipe (`nanorl --help | less`), not 80 columns. Typer lays them out at `rich_utils.MAX_WIDTH` (None: rich's
    own width), which its TERMINAL_WIDTH variable sets, and which is left alone when that is set."""
    from typer import rich_utils

    from nanorl.cli.ui import console, err_console, pipe_width

    if not os.environ.get("TERMINAL_WIDTH"):
        rich_utils.MAX_WIDTH = pipe_width(err_console if stderr else console)


def _run(argv: list[str]) -> int:
    """Run the app the way typer's standalone mode does, except that Ctrl-C reaches `main` as KeyboardInterrupt
    (typer turns it into a silent exit 130). Returns the exit code."""
    from typer import rich_utils

    try:
        from typer.exceptions import TyperException as UsageProblem  # typer vendors click since 0.2x
    except ImportError:  # an older typer: click's own
        from click import ClickException as UsageProblem

    command = typer.main.get_command(app)
    _typer_width(stderr=False)  # --help, and the help a group given no command shows
    try:
        with command.make_context("nanorl", list(argv)) as ctx:
            command.invoke(ctx)
    except typer.Exit as e:  # --help, --version, typer.Exit(code)
        return e.exit_code
    except typer.Abort as e:
        if isinstance(e.__context__, KeyboardInterrupt):  # Ctrl-C at a prompt
            raise KeyboardInterrupt from None
        _typer_width(stderr=True)
        rich_utils.rich_abort_error()  # "Aborted!": a question answered no
        return 1
    except UsageProblem as e:  # usage errors (exit 2), shown as typer shows them
        _typer_width(stderr=True)
        rich_utils.rich_format_error(e)
        return e.exit_code
    return 0


def _fail(message: str, hint: str | None, exit_code: int) -> None:
    """Print the error (never a traceback, whatever the text holds) and exit."""
    if state["debug"]:
        traceback.print_exc()
    try:
        print_error(message, hint)
    except Exception:  # the error printer failing must not bury the error
        with contextlib.suppress(Exception):
            sys.stderr.write(f"error: {message}\n" + (f"hint: {hint}\n" if hint else ""))
    sys.exit(exit_code)


def _os_error(e: OSError) -> tuple[str, str, int]:
    """A file-system error as (message, hint, exit code): the path and what is wrong with it. A bad NANORL_HOME,
    --dir or --out is bad input (2); an OSError without a path (a full disk, a network error) is not (1)."""
    what = e.strerror or str(e) or type(e).__name__
    path = os.fsdecode(e.filename) if e.filename is not None else None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # not bad input: the run stopped where a re-run takes it up
        where = f" ({os.path.dirname(path) or '.'})" if path else ""
        return (
            f"{what}{f': {path}' if path else ''}",
            f"free space on that disk{where}, then run the same command again: the stage resumes from its last"
            " checkpoint, which a failed write leaves whole",
            1,
        )
    if path is None:
        return f"{type(e).__name__}: {what}", "re-run with --debug for the traceback", 1
    message = f"{what}: {path}" + (f" -> {os.fsdecode(e.filename2)}" if e.filename2 is not None else "")
    home = os.environ.get("NANORL_HOME")
    if home and (path == home or path.startswith(home.rstrip("/") + "/")):
        hint = f"NANORL_HOME={home}: check that it is a folder you can write to"
    else:
        hint = "check that it is a folder you can write to (NANORL_HOME, --dir, --out)"
    return message, hint, 2


def _show_warnings_as_lines() -> None:
    """Warnings (bad data rows, ...) as one `warning: MESSAGE` line on stderr, each message once: not Python's
    `file.py:78: BadRowsWarning: ...` plus a source line. --debug keeps Python's format (where it came from)."""
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message)
        if text in seen:
            return
        seen.add(text)
        with contextlib.suppress(Exception):
            print_warning(text)

    if not state["debug"]:
        warnings.showwarning = show


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app, turning errors into one red line, a hint and an exit code (2 for
    bad input, 1 otherwise, 130 for Ctrl-C); a traceback only with --debug."""
    if argv is None:
        argv = sys.argv[1:]
    argv = _debug_first(list(argv))
    state["debug"] = argv[:1] == ["--debug"]
    _show_warnings_as_lines()
    try:
        _add_commands()
        code = _run(argv)
    except NanorlError as e:
        _fail(e.message, e.hint, e.exit_code)
    except KeyboardInterrupt as e:  # Ctrl-C (130); a SIGTERM (nanorl.stages.common.Stopped, 143) says what it did
        hint = "run the same command again: a stage resumes from its last checkpoint, a download from what arrived"
        _fail(str(e) or "interrupted", hint, getattr(e, "exit_code", 130))
    except BrokenPipeError:  # `nanorl ... | head`: the reader left; say nothing more
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        _fail(*_os_error(e))
    except SystemExit:
        raise
    except Exception as e:
        _fail(
            f"{type(e).__name__}: {e}",
            "this is a bug in nanorl or a plugin; re-run with --debug for the traceback and report it",
            1,
        )
    sys.exit(code)  # as typer's standalone mode did: SystemExit(0) on success too
