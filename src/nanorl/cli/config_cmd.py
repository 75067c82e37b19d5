"""`nanorl config show` and `nanorl config keys`: the resolved run configuration and what can be set."""

from __future__ import annotations

from pathlib import Path

import typer

from nanorl.cli.ui import Table, console, esc, print_json, print_warning

# The options every command that builds a run config accepts (pipeline, train, config show, ...).
PresetOpt = typer.Option(None, "--preset", help="Preset: tiny (CPU), d8, d12, d20, d26.")
DepthOpt = typer.Option(None, "--depth", help="Model depth (layers); width and heads follow from it.")
ConfigOpt = typer.Option(None, "--config", "-c", help="A TOML recipe file.", exists=False, dir_okay=False)
TaskOpt = typer.Option(None, "--task", help="The task (see `nanorl plugins list`).")
NameOpt = typer.Option(None, "--name", help="Run name (default: <task>-<preset or dN>).")
DataDirOpt = typer.Option(None, "--data-dir", help="Where the task's data files live (sets data.data_dir).")
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. model.seq_len=1024 rl.group_size=16.")


def build_config(preset, depth, config, task, name, overrides, data_dir=None):
    """Resolve a run config from the common CLI options (one way, shared by every command)."""
    from nanorl.api import NanorlError
    from nanorl.config import resolve

    if preset is not None and depth is not None:  # --depth sizes width and heads by the rule; a preset sets its own
        raise NanorlError(
            f"--preset {preset} and --depth {depth}: give one (the preset sets its own width and heads)",
            hint=f"the preset at another depth: --preset {preset} model.depth={depth}",
            exit_code=2,
        )
    try:
        return resolve(
            preset=preset,
            config_file=config,
            overrides=overrides or [],
            model__depth=depth,
            data__data_dir=data_dir,
            task=task,
            name=name,
        )
    except NanorlError as e:
        if e.hint is None:  # what to do about the errors config.resolve leaves without a hint
            e.hint = next((h for start, h in _HINTS if e.message.startswith(start)), None)
        raise


# (message start, hint) for config errors raised without a hint
_HINTS = (
    ("unknown preset", "--preset tiny runs on a CPU; or give the size itself with --depth N"),
    ("invalid run name", "pick another with --name, e.g. --name aqua-d8-try2 (it names the folder under runs/)"),
)


def register(app: typer.Typer) -> None:
    config_app = typer.Typer(help="Show the run configuration and its keys.", no_args_is_help=True)
    app.add_typer(config_app, name="config")

    @config_app.command("show")
    def show(
        overrides: list[str] = OverridesArg,
        preset: str = PresetOpt,
        depth: int = DepthOpt,
        config: Path = ConfigOpt,
        task: str = TaskOpt,
        name: str = NameOpt,
        data_dir: str = DataDirOpt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        toml: bool = typer.Option(False, "--toml", help="Print TOML (what run.toml holds)."),
    ) -> None:
        """Print the resolved run configuration (defaults, preset, recipe, overrides)."""
        from nanorl.api import NanorlError
        from nanorl.config import SECTIONS, to_toml

        if as_json and toml:
            raise NanorlError("give --json or --toml, not both", hint="--toml prints what run.toml holds", exit_code=2)
        cfg = build_config(preset, depth, config, task, name, overrides, data_dir=data_dir)
        from nanorl.plugins import get_plugins

        if cfg.task not in get_plugins().registry["task"]:  # shown anyway (a recipe for a machine that has it)
            print_warning(
                f"no installed plugin provides task {cfg.task!r}: a pipeline here would refuse it"
                " (`nanorl plugins list` shows the tasks)"
            )
        if as_json:
            print_json(cfg.to_dict())
            return
        if toml:
            typer.echo(to_toml(cfg), nl=False)
            return
        d = cfg.to_dict()
        table = Table(title=f"run config: {esc(cfg.name)}", title_justify="left", show_lines=False)
        table.add_column("key", style="cyan")
        table.add_column("value")
        for k, v in d.items():
            if k not in SECTIONS:
                table.add_row(k, esc(repr(v)))
        for s in SECTIONS:
            table.add_section()
            for k, v in d[s].items():
                table.add_row(f"{s}.{k}", esc(repr(v)))
        console.print(table)
        m = cfg.model
        console.print(
            f"[dim]model: {m.depth} layers, width {m.n_embd}, {m.n_head} heads of {cfg.head_dim} "
            f"({m.n_kv_head} kv heads), vocab {m.vocab_size}, context {m.seq_len}[/]"
        )

    @config_app.command("keys")
    def keys(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List every config key with its type, default and meaning."""
        import dataclasses

        from nanorl.config import SECTIONS, RunConfig

        cfg = RunConfig()
        rows = []
        for obj, prefix in [(cfg, "")] + [(getattr(cfg, s), s + ".") for s in SECTIONS]:
            for f in dataclasses.fields(obj):
                if f.name in SECTIONS:
                    continue
                rows.append(
                    {
                        "key": prefix + f.name,
                        "type": getattr(f.type, "__name__", str(f.type)),
                        "default": getattr(obj, f.name),
                        "help": f.metadata.get("help", ""),
                    }
                )
        if as_json:
            print_json(rows)
            return
        table = Table(title="config keys (set with key=value, or a bare name for every section)", title_justify="left")
        for col in ("key", "type", "default", "meaning"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(r["key"], esc(r["type"]), esc(repr(r["default"])), esc(r["help"]))
        console.print(table)
