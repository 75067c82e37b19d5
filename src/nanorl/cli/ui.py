"""What every command shares for talking to the user: the consoles, error printing, JSON output.

Text that comes from the user, a file, a plugin or an exception is never read as rich markup: "[model]" or
"[/b]" in a message prints as it is (print_error and print_warning build `Text`, and `esc` escapes a string that
goes into a markup template or a table cell).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich import table as rich_table
from rich.console import Console
from rich.markup import escape as esc
from rich.text import Text

__all__ = [
    "Table", "console", "err_console", "esc", "pipe_width", "print_error", "print_json", "print_warning", "state"
]  # fmt: skip

# Width for output that goes to a pipe or a file (`nanorl eval ... | cat`, a CI log): rich would squeeze it to 80
# columns, truncating table cells and splitting the commands users copy. A table only takes the width it needs.
PIPE_WIDTH = 200


def pipe_width(c: Console) -> int | None:
    """The width output through `c` is laid out to: PIPE_WIDTH when it goes to a pipe or a file and COLUMNS is
    not set; None (rich's own: the terminal's width, or COLUMNS) otherwise."""
    return PIPE_WIDTH if not c.is_terminal and not os.environ.get("COLUMNS") else None


def _console(stderr: bool = False) -> Console:
    c = Console(stderr=stderr)
    if width := pipe_width(c):
        c.width = width
    return c


console = _console()
err_console = _console(stderr=True)

# set by the app callback from --debug
state = {"debug": False}


def print_json(obj: Any) -> None:
    """Machine-readable output for --json: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_error(message: str, hint: str | None = None) -> None:
    """`error: MESSAGE` (red) and `hint: HINT` (dim) on stderr, the texts taken literally (no markup)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", str(message)), highlight=False, soft_wrap=True)
    if hint:
        err_console.print(Text.assemble(("hint:", "dim"), " ", str(hint)), highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    """`warning: MESSAGE` (yellow) on stderr, the text taken literally."""
    err_console.print(Text.assemble(("warning:", "yellow"), " ", str(message)), highlight=False, soft_wrap=True)


class Table(rich_table.Table):
    """rich's Table, whose cells fold onto the next line when a narrow terminal (COLUMNS=80) squeezes their column:
    rich's default cuts them to "…", and a file name, a mode or a confidence interval was lost. The tables every
    command prints are made with this one."""

    def add_column(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("overflow", "fold")
        super().add_column(*args, **kwargs)
