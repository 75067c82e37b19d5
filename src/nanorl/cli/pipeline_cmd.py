"""`nanorl pipeline`: run tokenizer -> base -> mid -> sft -> rl -> eval -> report into runs/<name>/."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from nanorl.cli.config_cmd import (
    ConfigOpt,
    DataDirOpt,
    DepthOpt,
    NameOpt,
    OverridesArg,
    PresetOpt,
    TaskOpt,
    build_config,
)
from nanorl.cli.ui import console, err_console, esc, print_json


def parse_steps(items: list[str] | None) -> dict[str, int]:
    """--steps base=200 --steps rl=50 -> {"base": 200, "rl": 50}."""
    from nanorl.api import NanorlError

    out = {}
    for item in items or []:
        stage, sep, n = item.partition("=")
        if not sep or not stage.strip() or not n.strip().isdigit():
            raise NanorlError(
                f"--steps {item!r} is not STAGE=N with N a whole number >= 0",
                hint="e.g. --steps base=200 (a stage's own budget rule again: STAGE.steps=-1)",
                exit_code=2,
            )
        out[stage.strip()] = int(n)
    return out


def require_size(preset, depth, config, overrides) -> None:
    """A pipeline names its model's size: without one the defaults would train a depth-8 (GPU-sized) model."""
    from nanorl.api import NanorlError

    keys = {item.partition("=")[0].strip() for item in overrides or []}
    if preset is None and depth is None and config is None and not keys & {"preset", "depth", "model.depth"}:
        raise NanorlError(
            "give the model's size: --preset, --depth or --config",
            hint="--preset tiny on a CPU, --depth 8 on a GPU",
            exit_code=2,
        )


def show_results(results: dict, run_dir: Path, as_json: bool = False) -> None:
    """The stages' summaries, as a table or JSON; under torchrun every rank returns them and rank 0 alone prints."""
    from rich.table import Table

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        print_json(results)
        return

    table = Table(title=f"run {run_dir.name}", title_justify="left")
    for col in ("stage", "status", "wall s", "result"):
        table.add_column(col)
    for stage, res in results.items():
        if res == "skipped":
            table.add_row(stage, "[dim]skipped (DONE)[/]", "", "")
            continue
        keys = [k for k in ("loss", "val_bpb", "reward", "acc", "vocab_size") if isinstance(res.get(k), (int, float))]
        keys += [k for k in res if k.endswith("_acc")]
        shown = ", ".join(f"{k} {res[k]:.4g}" for k in keys)
        table.add_row(stage, "[green]done[/]", f"{res.get('wall_s', 0):.0f}", shown)
    console.print(table)
    if (run_dir / "report.md").is_file():
        console.print(f"[dim]report: {esc(str(run_dir / 'report.md'))}[/]")


def register(app: typer.Typer) -> None:
    @app.command("pipeline")
    def pipeline(
        overrides: list[str] = OverridesArg,
        task: str = TaskOpt,
        depth: int = DepthOpt,
        preset: str = PresetOpt,
        config: Path = ConfigOpt,
        name: str = NameOpt,
        data_dir: str = DataDirOpt,
        from_stage: str = typer.Option(None, "--from", help="Re-run this stage and every later one."),
        only: str = typer.Option(None, "--only", help="Run only this stage (afresh)."),
        steps: list[str] = typer.Option(None, "--steps", help="STAGE=N: steps of a stage (repeatable)."),
        kl_every: int = typer.Option(
            None, "--kl-every", help="RL: letter/sequence KL telemetry every N steps (rl.kl_every; 0: never)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the stage summaries as JSON at the end."),
    ) -> None:
        """Train a model end to end: tokenizer, base, mid, sft, rl, eval, report (resumable; finished stages are
        skipped)."""
        from nanorl.config import run_dir
        from nanorl.stages.runner import run_pipeline

        require_size(preset, depth, config, overrides)
        if kl_every is not None:
            overrides = [*(overrides or []), f"rl.kl_every={kl_every}"]
        cfg = build_config(preset, depth, config, task, name, overrides, data_dir=data_dir)
        results = run_pipeline(cfg, from_stage=from_stage, only=only, steps=parse_steps(steps), console=err_console)
        show_results(results, run_dir(cfg.name), as_json)
