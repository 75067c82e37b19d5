"""`nanorl plugins list`: what is installed, what each plugin registered, and what failed to load."""

from __future__ import annotations

import typer

from nanorl.cli.ui import Table, console, esc, print_json, state


def register(app: typer.Typer) -> None:
    plugins_app = typer.Typer(help="Inspect the installed plugins.", no_args_is_help=True)
    app.add_typer(plugins_app, name="plugins")

    @plugins_app.command("list")
    def list_plugins(
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        traceback_: bool = typer.Option(
            False, "--traceback", help="Show the traceback of each load error (so does `nanorl --debug`)."
        ),
    ) -> None:
        """List plugins: name, version, hooks, what each registered, and load errors and warnings."""
        from nanorl.plugins import get_plugins

        plugins = get_plugins()
        infos = list(plugins.infos.values())
        if as_json:
            print_json({"plugins": [i.as_dict() for i in infos]})
            return
        from rich.text import Text

        table = Table(title="nanorl plugins", title_justify="left")
        for col in ("plugin", "source", "version", "hooks", "registered", "status"):
            table.add_column(col, overflow="fold")
        for i in infos:
            registered = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in i.registered.items()) or "-"
            hooks = "\n".join(h.removeprefix("register_") for h in i.hooks) or "-"
            # what a plugin says about itself is text, never markup
            status = f"[red]{len(i.errors)} error{'s' * (len(i.errors) > 1)}[/]" if i.errors else "[green]ok[/]"
            if i.warnings:
                status += f"\n[yellow]{len(i.warnings)} warning{'s' * (len(i.warnings) > 1)}[/]"
            table.add_row(esc(i.name), esc(i.source), esc(i.version), esc(hooks), esc(registered), status)
        console.print(table)
        for i in infos:
            for err in i.errors:
                line = Text.assemble(("x", "red"), " ", (i.name, "bold"), f" ({i.source}): {err}")
                console.print(line, highlight=False, soft_wrap=True)
            for warning in i.warnings:
                line = Text.assemble(("!", "yellow"), " ", (i.name, "bold"), f" ({i.source}): {warning}")
                console.print(line, highlight=False, soft_wrap=True)
        if traceback_ or state["debug"]:
            for i in infos:
                if i.traceback:
                    console.rule(esc(i.name))
                    console.print(i.traceback, markup=False, highlight=False)
        elif any(i.errors for i in infos):
            console.print(
                "[dim]What a plugin failed to load or register is skipped; everything else works. "
                "`--traceback` shows where.[/]"
            )
