"""`nanorl runs ...`: the runs in $NANORL_HOME, and moving them to and from a store (S3 or a folder).

    nanorl runs list                                  # every run: task, model, stages done, final accuracy
    nanorl runs push aqua-d8 s3://bucket/prefix       # the whole run folder to s3://bucket/prefix/aqua-d8/
    nanorl runs pull s3://bucket/prefix/aqua-d8       # back into $NANORL_HOME/runs/aqua-d8/

A pipeline with `checkpoint.store=URL` mirrors its run there as it goes, so a run trained on a rented machine
that is gone can be pulled, evaluated, resumed or extended here.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from nanorl.cli.ui import console, esc, print_json


def _store_and_name(url: str) -> tuple[object, str, str | None, str]:
    """URL of a run in a store (s3://bucket/prefix/RUN[/STAGE], or a folder path .../RUN[/STAGE]) ->
    (store, run name, stage or None, the store's URL)."""
    from nanorl.store import open_store
    from nanorl.store.runs import split_url

    if url.startswith("s3://"):
        store_url, name, stage = split_url(url)
    else:
        from nanorl.config import STAGES

        p = Path(url.removeprefix("file://")).expanduser()
        stage = p.name if p.name in STAGES else None
        p = p.parent if stage else p
        store_url, name = str(p.parent), p.name
    return open_store(store_url), name, stage, store_url


def run_summary(run: Path) -> dict:
    """What `runs list` shows of one run folder: task, model shape, stages done, the final eval, size."""
    from nanorl.api import NanorlError
    from nanorl.config import MODEL_STAGES, from_toml_file

    row: dict = {"name": run.name, "path": str(run)}
    try:
        cfg = from_toml_file(run / "run.toml")
        row.update(task=cfg.task, depth=cfg.model.depth, width=cfg.model.n_embd, store=cfg.checkpoint.store or None)
    except NanorlError as e:
        row["error"] = e.message
    row["done"] = [s for s in ("tokenizer", *MODEL_STAGES, "eval") if (run / s / "DONE").is_file()]
    row["evals"] = {}
    for f in sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []:
        try:
            res = json.loads(f.read_text())
            gen = res["modes"].get("generative") or next(iter(res["modes"].values()))
            row["evals"][f.stem] = {
                "split": res["split"], "stage": res.get("stage"), "n": gen["n"], "accuracy": gen["accuracy"]
            }  # fmt: skip
        except (json.JSONDecodeError, KeyError, StopIteration, TypeError):
            continue  # a file another version wrote, or half-written: the list skips it, `eval` rewrites it
    files = [p for p in run.rglob("*") if p.is_file()]
    row["mb"] = round(sum(p.stat().st_size for p in files) / 1e6, 1)
    row["modified"] = max((p.stat().st_mtime for p in files), default=run.stat().st_mtime)
    return row


def register(app: typer.Typer) -> None:
    runs = typer.Typer(help="List runs, and push or pull them to and from a store (S3 or a folder).")
    app.add_typer(runs, name="runs")

    @runs.command("list")
    def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Every run in $NANORL_HOME/runs: task, model, stages done, final accuracy, size."""
        import time

        from rich.table import Table

        from nanorl.config import nanorl_home

        root = nanorl_home() / "runs"
        found = sorted(p for p in root.iterdir() if (p / "run.toml").is_file()) if root.is_dir() else []
        rows = sorted((run_summary(p) for p in found), key=lambda r: -r["modified"])
        if as_json:
            print_json(rows)
            return
        if not rows:
            console.print(f"no runs in {esc(str(root))}", highlight=False)
            console.print("[dim]start one: nanorl pipeline --task arith --preset tiny[/]")
            return
        table = Table(title=f"{len(rows)} run(s) in {esc(str(root))}, newest first", title_justify="left")
        for col in ("run", "task", "depth", "done up to", "accuracy", "MB", "modified"):
            table.add_column(col, justify="right" if col in ("depth", "MB") else "left")
        for r in rows:
            evals = "\n".join(f"{e['split']} {e['stage']} {e['accuracy']:.1%}" for e in r["evals"].values())
            table.add_row(
                esc(r["name"]), esc(r["task"]) if "task" in r else f"[red]{esc(r.get('error', '?'))}[/]",
                str(r.get("depth", "")),
                r["done"][-1] if r["done"] else "-", evals or "-", f"{r['mb']:.1f}",
                time.strftime("%Y-%m-%d %H:%M", time.localtime(r["modified"])),
            )  # fmt: skip
        console.print(table)

    @runs.command("push")
    def push(
        name: str = typer.Argument(..., help="The run (a folder in $NANORL_HOME/runs)."),
        url: str = typer.Argument(..., help="The store: s3://bucket/prefix or a folder. The run goes under NAME/."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Upload a whole run folder to a store (what `checkpoint.store` does during a run)."""
        from nanorl.api import NanorlError
        from nanorl.config import run_dir
        from nanorl.store import open_store
        from nanorl.store.runs import push_run

        d = run_dir(name)
        if not (d / "run.toml").is_file():
            raise NanorlError(f"no run named {name!r} ({d} has no run.toml)", hint="nanorl runs list")
        with console.status(f"uploading {esc(str(d))}..."):
            sent = push_run(d, open_store(url), name)
        dest = f"{url.rstrip('/')}/{name}"
        if as_json:
            print_json({"run": name, "to": dest, "files": sent})
            return
        mb = sum((d / f).stat().st_size for f in sent) / 1e6
        console.print(f"pushed {len(sent)} files ({mb:.1f} MB) to {esc(dest)}", highlight=False)

    @runs.command("pull")
    def pull(
        url: str = typer.Argument(..., help="A run in a store: s3://bucket/prefix/RUN, or a folder path .../RUN."),
        name: str = typer.Option(None, "--name", help="The local run name (default: RUN)."),
        force: bool = typer.Option(False, "--force", help="Overwrite a local run of that name (its files)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Download a run into $NANORL_HOME/runs: then eval, report, resume or train more as if it ran here."""
        from nanorl.api import NanorlError
        from nanorl.config import run_dir
        from nanorl.store.runs import pull_run

        store, remote, stage, store_url = _store_and_name(url)
        if stage is not None:
            raise NanorlError(f"{url!r} names a stage: pull the run", hint=url.rstrip("/").rpartition("/")[0])
        d = run_dir(name or remote)
        if d.exists() and any(d.iterdir()) and not force:
            raise NanorlError(
                f"a run {d.name!r} exists here ({d})",
                hint="--name OTHER to pull beside it, or --force to overwrite its files",
                exit_code=2,
            )
        with console.status(f"downloading {esc(remote)} from {esc(store_url)}..."):
            got = pull_run(store, remote, d, where=store_url)
        if as_json:
            print_json({"run": d.name, "path": str(d), "files": got})
            return
        mb = sum((d / f).stat().st_size for f in got) / 1e6
        console.print(f"pulled {len(got)} files ({mb:.1f} MB) into {esc(str(d))}", highlight=False)
        console.print(f"[dim]nanorl eval --checkpoint {esc(d.name)}    nanorl runs list[/]", highlight=False)
