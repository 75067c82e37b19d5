"""`nanorl cloud ...`: run nanorl on rented GPUs through a cloud backend plugin (`lambda` ships with nanorl).

    nanorl cloud types                                   # what is free now, and its price
    nanorl cloud estimate gpu_1x_h100_pcie --hours 4
    nanorl cloud launch gpu_1x_h100_pcie --setup "pip install git+https://github.com/YOU/nanorl@COMMIT \
        git+https://github.com/YOU/nanorl@COMMIT#subdirectory=plugins/aqua"
    nanorl cloud list | status ID | logs ID | terminate ID

The commands are the same for every backend (`CloudBackend` in nanorl.api); `--backend` picks one when several
are installed. Launching shows the price and asks before anything is billed (`--yes` skips the question;
without a terminal it is required). `--setup` (or NANORL_CLOUD_SETUP) says how to install nanorl on the machine;
the default command then trains AQuA at depth 8. `--wait` follows the machine until it is up.
`--end-when-done` and `--end-after HOURS` make the machine end itself (billing stops), where the backend can.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

import typer

from nanorl.api import NanorlError
from nanorl.cli.ui import console, err_console, esc, print_json

# depth 8's token budget is ~1.2 B tokens, about 24 FineWeb-EDU shards (README, "Using it")
DEFAULT_COMMAND = (
    "nanorl data download fineweb --shards 24 && nanorl pipeline --task aqua --depth 8 data.corpus=fineweb"
)
# statuses after which a machine will not come up
DEAD = ("unhealthy", "terminating", "terminated", "preempted")

BackendOpt = typer.Option(None, "--backend", help="The cloud backend (default: the only one installed).")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")


def _backend(name: str | None):
    from nanorl.plugins import get_plugins

    plugins = get_plugins()
    if name:
        return plugins.backend(name)
    names = sorted(plugins.registry["backend"])
    if len(names) == 1:
        return plugins.backend(names[0])
    if not names and plugins.excluded:  # installed, but NANORL_PLUGINS leaves them out
        raise NanorlError(
            f"no cloud backend is loaded: NANORL_PLUGINS={os.environ.get('NANORL_PLUGINS', '')!r} leaves out the "
            f"installed plugins {', '.join(plugins.excluded)}",
            hint="add the backend's plugin to NANORL_PLUGINS (e.g. NANORL_PLUGINS=lambda), or unset it",
            exit_code=2,
        )
    if not names:
        raise NanorlError("no cloud backend is installed", hint="pip install nanorl-plugin-lambda")
    raise NanorlError(f"several cloud backends are installed: {', '.join(names)}", hint="pick one with --backend")


def _as_dict(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def _instances_table(instances, title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("id", "name", "status", "type", "region", "ip", "$/h"):
        table.add_column(col, justify="right" if col == "$/h" else "left")
    for i in instances:
        color = "green" if i.status == "active" else "yellow" if i.status == "booting" else "red"
        price = f"{i.price_per_hour:.2f}" if i.price_per_hour is not None else "-"
        cells = (i.id, i.name or "-", i.status, i.instance_type, i.region or "-", i.ip or "-", price)
        cells = [esc(str(c)) for c in cells]  # what the API says is text, never markup
        cells[2] = f"[{color}]{cells[2]}[/]"
        table.add_row(*cells)
    return table


def _env(pairs: list[str]) -> dict[str, str]:
    """--env KEY=VALUE, or --env KEY to pass on the variable of this shell."""
    env = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not key.isidentifier() or not key.isascii():  # what a shell takes as a variable's name
            raise NanorlError(
                f"--env {pair}: {key!r} is not a variable name",
                hint="letters, digits and _, not starting with a digit: --env NAME=VALUE",
                exit_code=2,
            )
        if not eq:
            if key not in os.environ:
                raise NanorlError(
                    f"--env {key}: no such variable in this shell", hint=f"--env {key}=VALUE", exit_code=2
                )
            value = os.environ[key]
        env[key] = value
    return env


def _status(backend, instance_id: str):
    """One machine's status; an id the backend does not know is bad input (exit 2)."""
    try:
        return backend.status(instance_id)
    except NanorlError as e:
        _raise_if_unknown_id(e)
        raise


def _raise_if_unknown_id(e: NanorlError) -> None:
    """An API's "no such instance" (HTTP 404, which a backend's error carries as `status`, as Lambda's does) as bad
    input, with where to find the ids."""
    if getattr(e, "status", None) == 404:
        hint = "`nanorl cloud list` shows your machines and their ids"
        raise NanorlError(e.message, hint=hint, exit_code=2) from e


def _confirm(question: str, why: str) -> None:
    """Ask before an action that costs money or data; without a terminal to ask on, refuse (the user passes --yes)."""
    if not sys.stdin.isatty():
        raise NanorlError(f"{why}: confirm with --yes", hint="run the command again with --yes", exit_code=2)
    typer.confirm(question, abort=True)


class _Signalled(KeyboardInterrupt):
    """A signal that ends the command (SIGTERM, SIGHUP), raised where Ctrl-C would be, with the shell's exit
    code for it (128 + its number)."""

    def __init__(self, signum: int):
        import signal

        super().__init__(f"terminated ({signal.Signals(signum).name})")
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise `_Signalled` while the block runs: a launch stopped by one says which machine it
    rented (by default they end the process at once, silently, the machine billed)."""
    import signal

    def handler(signum, frame):
        raise _Signalled(signum)

    if threading.current_thread() is not threading.main_thread():  # (signals are handled there only)
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _wait_active(backend, instance_id: str, timeout_min: float):
    """Poll until the machine is active (returned) or dead or the timeout passes (NanorlError)."""
    poll_s = float(os.environ.get("NANORL_CLOUD_POLL_S", "10"))
    deadline = time.monotonic() + timeout_min * 60
    with console.status(f"waiting for {instance_id} to boot...") as spinner:
        while True:
            inst = backend.status(instance_id)
            if inst.status == "active" and inst.ip:
                return inst
            if inst.status in DEAD:
                raise NanorlError(
                    f"instance {instance_id} is {inst.status} before it came up",
                    hint=f"nanorl cloud terminate {instance_id} if it still shows, then launch again",
                )
            if time.monotonic() > deadline:
                raise NanorlError(
                    f"instance {instance_id} is still {inst.status} after {timeout_min:g} minutes",
                    hint=f"it is billed meanwhile: nanorl cloud status {instance_id}, or nanorl cloud terminate",
                )
            spinner.update(f"waiting for {instance_id} to boot ({inst.status})...")
            time.sleep(poll_s)


def register(app: typer.Typer) -> None:
    cloud = typer.Typer(help="Run nanorl on rented GPUs (a cloud backend plugin: lambda).", no_args_is_help=True)
    app.add_typer(cloud, name="cloud")

    @cloud.command("types")
    def types(backend: str = BackendOpt, as_json: bool = JsonOpt) -> None:
        """The machines the backend rents: price, GPUs, and the regions where one is free now."""
        found = _backend(backend).types()
        if as_json:
            print_json([_as_dict(t) for t in found])
            return
        from rich.table import Table

        table = Table(title=f"{len(found)} instance types (free ones first, then by price)", title_justify="left")
        for col in ("type", "what", "GPUs", "$/h", "free in"):
            table.add_column(col, justify="right" if col in ("GPUs", "$/h") else "left")
        for t in found:
            free = esc(", ".join(t.regions_available)) or "[dim]none now[/]"
            table.add_row(esc(t.name), esc(t.description), str(t.gpus), f"{t.price_per_hour:.2f}", free)
        console.print(table)

    @cloud.command("estimate")
    def estimate(
        instance_type: str = typer.Argument(..., help="The instance type, e.g. gpu_1x_h100_pcie."),
        hours: float = typer.Option(1.0, "--hours", help="How long it would run.", min=0),
        backend: str = BackendOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """What a machine costs for so many hours, and the regions that have one free now."""
        from nanorl.api import LaunchSpec

        est = _backend(backend).estimate(LaunchSpec(instance_type, command="", max_hours=hours))
        if as_json:
            print_json(_as_dict(est))
            return
        regions = esc(", ".join(est.regions_available)) or "[red]none now[/]"
        console.print(
            f"{esc(est.instance_type)}: ${est.price_per_hour:.2f}/h x {est.hours:g} h = [bold]${est.total:.2f}[/]"
            f"; free in: {regions}",
            highlight=False,
        )

    @cloud.command("launch")
    def launch(
        instance_type: str = typer.Argument(..., help="The instance type, e.g. gpu_1x_h100_pcie."),
        command: str = typer.Option(DEFAULT_COMMAND, "--command", "-c", help="What to run on the machine."),
        setup: str = typer.Option(
            None, "--setup", help="Shell run first: how to install nanorl there (default: $NANORL_CLOUD_SETUP)."
        ),
        env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, or KEY to pass this shell's value."),
        region: str = typer.Option(None, "--region", help="Default: the first region with capacity."),
        ssh_key: str = typer.Option(None, "--ssh-key", help="Default: the account's only key."),
        name: str = typer.Option(None, "--name", help="A name for the machine."),
        image: str = typer.Option(None, "--image", help="An image family (default: the backend's)."),
        hours: float = typer.Option(
            None, "--hours", help="Hours to price in the confirmation (default: --end-after, else 1).", min=0
        ),
        end_when_done: bool = typer.Option(
            False, "--end-when-done", help="The machine ends itself when the command has ended (billing stops)."
        ),
        end_after: float = typer.Option(
            None, "--end-after", help="HOURS: the machine ends itself after this long, done or not.", min=0
        ),
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before launching."),
        wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the machine until it is up."),
        timeout_min: float = typer.Option(25.0, "--timeout-min", help="How long --wait waits (minutes, > 0)."),
        backend: str = BackendOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """Rent a machine and start a nanorl command on it (its output goes to ~/nanorl.log there)."""
        from nanorl.api import LaunchSpec

        if not timeout_min > 0:  # checked before anything is rented
            raise NanorlError(
                f"--timeout-min {timeout_min:g}: give a positive number of minutes",
                hint="e.g. --timeout-min 25 (the default), or --no-wait",
                exit_code=2,
            )
        if end_after is not None and not end_after > 0:  # (a machine that ends itself at once: a typo)
            raise NanorlError(
                f"--end-after {end_after:g}: give a positive number of hours",
                hint="e.g. --end-after 12 (a cap on the bill), or leave it out",
                exit_code=2,
            )
        setup = setup or os.environ.get("NANORL_CLOUD_SETUP")
        if not setup:
            # no default: an install by bare package name would run whatever owns that name next to your secrets
            raise NanorlError(
                "say how to install nanorl on the machine: --setup (or NANORL_CLOUD_SETUP)",
                hint='e.g. --setup "pip install git+https://github.com/YOU/nanorl@COMMIT'
                ' git+https://github.com/YOU/nanorl@COMMIT#subdirectory=plugins/aqua" (nanorl, and the aqua plugin'
                " the default command trains with)",
                exit_code=2,
            )
        b = _backend(backend)
        ends = end_when_done or end_after is not None
        if ends and not b.can_end_itself:
            raise NanorlError(
                f"the {b.name} backend cannot end a machine from inside it",
                hint="drop --end-when-done/--end-after, and end it with nanorl cloud terminate",
                exit_code=2,
            )
        if ends and "checkpoint.store=" not in command:
            # the disk goes with the machine: say so before it is too late
            err_console.print(
                "[yellow]warning:[/] the machine's disk is deleted when it ends, and the command mirrors nothing: "
                "add checkpoint.store=s3://BUCKET/PREFIX to it (with -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY) "
                "to keep the run",
                highlight=False,
            )
        hours = hours if hours is not None else end_after if end_after is not None else 1.0
        spec = LaunchSpec(
            instance_type, command, region=region, name=name, ssh_key=ssh_key, image=image, env=_env(env),
            max_hours=hours, setup=setup or None, end_when_done=end_when_done, end_after_hours=end_after,
        )  # fmt: skip
        est = b.estimate(spec)
        # where one is free now (what `cloud types` shows): refused here, not after the user said yes to the price
        free = est.regions_available
        if not free or (region and region not in free):
            where = f"it is free now in: {', '.join(free)} (--region)" if free else "see `nanorl cloud types`"
            raise NanorlError(f"no capacity for {instance_type} {f'in {region} ' if region else ''}now", hint=where)
        price = f"{instance_type} at ${est.price_per_hour:.2f}/h (${est.total:.2f} for {hours:g} h)"
        if end_after is not None:
            price += f", ending itself after {end_after:g} h"
        if end_when_done:
            price += ", ending itself when the command ends"
        if not yes:
            _confirm(f"Launch {price} to run `{command}`?", "launching rents a paid machine")
        elif not as_json:
            console.print(f"launching {price}", highlight=False)
        with _signals_interrupt():  # SIGTERM (`timeout`, a CI job's end), SIGHUP: as Ctrl-C, said, not silent
            inst = b.launch(spec)
            if wait:
                try:
                    inst = _wait_active(b, inst.id, timeout_min)
                except BaseException as e:
                    # the machine is rented and billed whatever went wrong while waiting (an API error, Ctrl-C):
                    # say which one it is before the error, on stdout as JSON with --json, so a script can end it
                    billed = f"billed until it is terminated: nanorl cloud terminate {inst.id}"
                    if as_json:
                        print_json(_as_dict(inst))
                    elif not isinstance(e, KeyboardInterrupt):
                        err_console.print(
                            f"launched {inst.id} ({billed})", highlight=False, markup=False, soft_wrap=True
                        )
                    if isinstance(e, KeyboardInterrupt):  # (not the CLI's "a stage resumes from its checkpoint")
                        why = str(e) or "interrupted"
                        raise NanorlError(
                            f"{why} while waiting for {inst.id} to boot: it is rented",
                            hint=billed,
                            exit_code=getattr(e, "exit_code", 130),
                        ) from None
                    raise
        if as_json:
            print_json(_as_dict(inst))
            return
        console.print(_instances_table([inst], f"launched on {b.name}"))
        if inst.ip:
            console.print(f"ssh ubuntu@{inst.ip}   (the run: tmux attach -t nanorl)", highlight=False)
        ending = " (it also ends itself)" if ends else ""
        console.print(
            f"follow: nanorl cloud logs {inst.id}    end (billing stops): nanorl cloud terminate {inst.id}{ending}",
            highlight=False,
        )

    @cloud.command("list")
    def list_(backend: str = BackendOpt, as_json: bool = JsonOpt) -> None:
        """Your machines on the backend, with their status and address."""
        instances = _backend(backend).list()
        if as_json:
            print_json([_as_dict(i) for i in instances])
            return
        console.print(_instances_table(instances, f"{len(instances)} instance(s)"))

    @cloud.command("status")
    def status(instance_id: str, backend: str = BackendOpt, as_json: bool = JsonOpt) -> None:
        """One machine's status and address."""
        inst = _status(_backend(backend), instance_id)
        if as_json:
            print_json(_as_dict(inst))
            return
        console.print(_instances_table([inst], inst.id))

    @cloud.command("logs")
    def logs(instance_id: str, backend: str = BackendOpt) -> None:
        """The end of the run's log on the machine (~/nanorl.log, over ssh)."""
        b = _backend(backend)
        inst = _status(b, instance_id)
        # no machine to ssh into: say so, rather than let ssh fail and blame the keys
        if inst.status in ("terminating", "terminated", "preempted"):
            raise NanorlError(
                f"instance {instance_id} is {inst.status}: its disk, and the run's log with it, is gone",
                hint="a run keeps what it mirrors to checkpoint.store (nanorl runs pull)",
            )
        sys.stdout.write(b.logs(instance_id))

    @cloud.command("terminate")
    def terminate(
        instance_id: str,
        yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
        backend: str = BackendOpt,
        as_json: bool = JsonOpt,
    ) -> None:
        """End a machine: billing stops, and its disk (the run's checkpoints, unless mirrored to S3) is gone."""
        if not yes:
            _confirm(f"Terminate {instance_id}? Its disk is deleted.", "terminating deletes the machine and its disk")
        try:
            inst = _backend(backend).terminate(instance_id)
        except NanorlError as e:
            _raise_if_unknown_id(e)
            raise
        if as_json:
            print_json(_as_dict(inst))
            return
        console.print(f"{inst.id}: {inst.status}", highlight=False, markup=False)
