"""What every command shares for talking to the user: the consoles, error printing, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)

# set by the app callback from --debug
state = {"debug": False}


def print_json(obj: Any) -> None:
    """Machine-readable output for --json: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_error(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    if hint:
        err_console.print(f"[dim]hint:[/] {hint}", highlight=False)
