"""The hooks a nanorl plugin may implement. Each receives a `register` callable (or the CLI app) and calls it.

Plugins decorate their functions with `nanorl.api.hookimpl`; names and argument names must match these.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("nanorl")


@hookspec
def register_tasks(register):
    """Call `register(task)` for each `nanorl.api.Task` instance the plugin provides (keyed by `task.name`)."""


@hookspec
def register_rewards(register):
    """Call `register(reward)` for each `nanorl.api.Reward` (keyed by `reward.name`, e.g. "aqua.correct")."""


@hookspec
def register_telemetry(register):
    """Call `register(hook)` for each `nanorl.api.TelemetryHook` instance (keyed by `hook.name`)."""


@hookspec
def register_backends(register):
    """Call `register(backend)` for each `nanorl.api.CloudBackend` instance (keyed by `backend.name`)."""


@hookspec
def register_commands(app):
    """Add Typer commands or sub-apps to the `nanorl` CLI: `app.add_typer(...)` or `@app.command()`."""
