"""`nanorl train STAGE --run NAME`: run one stage of an existing run (optionally from a given checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from nanorl.cli.config_cmd import OverridesArg
from nanorl.cli.ui import err_console


def resolve_checkpoint(spec: str, workdir: Path | None) -> Path:
    """A checkpoint folder, a run name's final model, RUN/STAGE (that stage of a run under $NANORL_HOME/runs), or
    a run in a store, s3://bucket/prefix/RUN[/STAGE] (its run.toml, tokenizer and that stage, by default its last
    finished model, downloaded into `workdir`/RUN, which an s3:// spec needs)."""
    from nanorl import checkpoint as ckpt
    from nanorl.api import NanorlError
    from nanorl.config import run_dir

    if spec.startswith("s3://"):
        # under torchrun rank 0 alone downloads (into the shared run folder); the others only find which stage it
        # is, then wait for rank 0 in the process group's rendezvous, which it joins once the files are there
        return pull_stage(spec, workdir, download=int(os.environ.get("RANK", "0")) == 0)
    p = Path(spec).expanduser()
    if p.is_dir() and ckpt.has_checkpoint(p):
        return p
    if not p.is_absolute() and len(p.parts) == 2 and ckpt.has_checkpoint(run_dir(p.parts[0]) / p.parts[1]):
        return run_dir(p.parts[0]) / p.parts[1]
    run = p if (p / "run.toml").is_file() else run_dir(spec)
    if (run / "run.toml").is_file():
        for stage in ("rl", "sft", "mid", "base"):
            if ckpt.is_done(run / stage):
                return run / stage
        raise NanorlError(f"run {spec!r} has no finished model stage yet", hint="run the pipeline first", exit_code=2)
    raise NanorlError(
        f"no checkpoint at {spec!r}",
        hint="give a run name, RUN/STAGE (e.g. arith-tiny/sft), a stage folder, or s3://bucket/prefix",
        exit_code=2,
    )


def pull_stage(url: str, workdir: Path, download: bool = True) -> Path:
    """Download s3://bucket/prefix/RUN[/STAGE] (without STAGE: the run's last finished model stage) as a run
    folder `workdir`/RUN holding run.toml, the tokenizer and that stage; returns the stage's folder (`download`
    False: only its path, the store still checked and the stage chosen)."""
    from nanorl.api import NanorlError
    from nanorl.store import open_store
    from nanorl.store.runs import no_run, pull_run, split_url

    store_url, name, stage = split_url(url)
    store = open_store(store_url)
    store.check()
    if stage is None:
        keys = set(store.list(f"{name}/"))
        if f"{name}/run.toml" not in keys:
            raise no_run(store, name, store_url)
        stage = next((s for s in ("rl", "sft", "mid", "base") if f"{name}/{s}/DONE" in keys), None)
        if stage is None:
            raise NanorlError(
                f"run {name!r} in {store_url} has no finished model stage", hint=f"name one: {url}/sft", exit_code=2
            )
    if download:
        pull_run(store, name, workdir / name, stage=stage, where=store_url)
    return workdir / name / stage


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train(
        stage: str = typer.Argument(..., help="base, mid, sft or rl."),
        run: str = typer.Option(..., "--run", help="The run (its folder holds run.toml and the tokenizer)."),
        checkpoint: str = typer.Option(
            None, "--checkpoint", help="Start from this checkpoint (run name, RUN/STAGE, folder or s3:// URL)."
        ),
        steps: int = typer.Option(None, "--steps", min=0, help="Steps of this stage."),
        overrides: list[str] = OverridesArg,
        as_json: bool = typer.Option(False, "--json", help="Print the stage summary as JSON."),
    ) -> None:
        """Run one training stage of an existing run (afresh), e.g. more RL from the SFT model."""
        from nanorl.api import NanorlError
        from nanorl.config import run_dir, set_value
        from nanorl.stages.runner import read_run_config, run_pipeline

        if stage not in ("base", "mid", "sft", "rl"):
            raise NanorlError(f"cannot train stage {stage!r}", hint="base, mid, sft or rl", exit_code=2)
        toml = run_dir(run) / "run.toml"
        if not toml.is_file():
            raise NanorlError(
                f"no run named {run!r} ({toml} is missing)", hint="start one with nanorl pipeline", exit_code=2
            )
        cfg = read_run_config(toml)
        from nanorl.config import parse_overrides, validate

        for k, v in parse_overrides(overrides or []):
            set_value(cfg, k, v)
        validate(cfg)
        init = {}
        if checkpoint:
            init[stage] = resolve_checkpoint(checkpoint, run_dir(run) / f"{stage}-init")
        results = run_pipeline(
            cfg, only=stage, steps={stage: steps} if steps is not None else None, init_from=init, console=err_console
        )
        from nanorl.cli.pipeline_cmd import show_results

        show_results(results, run_dir(run), as_json)
