"""`nanorl runs ...`: the runs in $NANORL_HOME, and moving them to and from a store (S3 or a folder).

    nanorl runs list                                  # every run: task, model, stages done, final accuracy
    nanorl runs list s3://bucket/prefix               # the runs in a store: stages done, partial
    nanorl runs show aqua-d8                          # one run: model, stages, evals with baselines, entropy
    nanorl runs push aqua-d8 s3://bucket/prefix       # the whole run folder to s3://bucket/prefix/aqua-d8/
    nanorl runs pull s3://bucket/prefix/aqua-d8       # back into $NANORL_HOME/runs/aqua-d8/

A pipeline with `checkpoint.store=URL` mirrors its run there as it goes, so a run trained on a rented machine
that is gone can be pulled, evaluated, resumed or extended here.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from nanorl.cli.ui import Table, console, esc, print_json, print_warning


def _store_and_name(url: str) -> tuple[object, str, str | None, str]:
    """URL of a run in a store (s3://bucket/prefix/RUN[/STAGE], or a folder path .../RUN[/STAGE]) ->
    (store, run name, stage or None, the store's URL)."""
    from nanorl.store import check_folder_url, open_store
    from nanorl.store.runs import split_url

    if url.startswith("s3://"):
        store_url, name, stage = split_url(url)
    else:
        from nanorl.config import STAGES

        check_folder_url(url)  # as typed: Path() below would make `s3//b/p` a plain folder

        p = Path(url.removeprefix("file://")).expanduser()
        stage = p.name if p.name in STAGES else None
        p = p.parent if stage else p
        store_url, name = str(p.parent), p.name
    store = open_store(store_url)
    store.check()  # an unreachable store: one line saying what to fix, in seconds
    return store, name, stage, store_url


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


def _is_run_folder(d: Path) -> bool:
    from nanorl.config import STAGES

    return d.is_dir() and (
        (d / "run.toml").is_file() or (d / "metrics.jsonl").is_file() or any((d / s).is_dir() for s in STAGES)
    )


def locate_run(spec: str) -> Path:
    """A run folder: a path to one (it holds run.toml, metrics.jsonl or a stage folder), else a run's name under
    $NANORL_HOME/runs. Unknown: a NanorlError (exit 2) naming where it looked."""
    from nanorl.api import NanorlError
    from nanorl.config import nanorl_home, run_dir

    p = Path(spec).expanduser()
    looked = [p.resolve()]
    if not p.is_absolute() and spec not in (".", ".."):
        looked.append(run_dir(spec))
    for d in looked:
        if _is_run_folder(d):
            return d
    looked = list(dict.fromkeys(looked))
    where = " and ".join(str(d) for d in looked)
    empty = [d for d in looked if d.is_dir()]
    why = f" ({', '.join(map(str, empty))}: no run.toml, metrics.jsonl or stage folder)" if empty else ""
    raise NanorlError(
        f"no run {spec!r}: looked for a run folder at {where}{why}",
        hint=f"`nanorl runs list` lists the runs in {nanorl_home() / 'runs'}; or give a run folder's path",
        exit_code=2,
    )


def _num(v, spec: str = ".3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def show_run(data: dict) -> None:
    """`runs show`'s tables, from `nanorl.report.run_overview`'s data."""
    from nanorl.cli.model_cmd import human_count
    from nanorl.report import ENTROPY_SUMMARY, fmt_value, paired_test_name

    # the run: where, what, which model
    head = Table(title=f"run {esc(data['name'])}", title_justify="left", show_header=False)
    head.add_column("key", style="cyan")
    head.add_column("value")
    head.add_row("path", esc(data["path"]))
    cfg = data["config"]
    if "error" in cfg:
        head.add_row("run.toml", f"[red]{esc(cfg['error'])}[/]")
    else:
        m = cfg["model"]
        n = m["params"]
        head.add_row("task", esc(str(cfg["task"])) + (f" (preset {esc(cfg['preset'])})" if cfg.get("preset") else ""))
        head.add_row(
            "model",
            f"depth {m['depth']}, width {m['width']}, {m['n_head']} heads ({m['n_kv_head']} kv), "
            f"vocab {m['vocab_size']}, context {m['seq_len']}",
        )
        head.add_row(
            "parameters",
            f"{human_count(n['total'])} ({n['total']:,}: embedding {human_count(n['embedding'])}, "
            f"matrices {human_count(n['matrices'])}, unembedding {human_count(n['unembedding'])})",
        )
        head.add_row("device, dtype", f"{esc(cfg['device'])}, {esc(cfg['dtype'])} [dim](as run.toml sets them)[/]")
        head.add_row("seed", str(cfg["seed"]))
        if cfg.get("store"):
            head.add_row("store", esc(cfg["store"]))
    console.print(head)

    # the stages
    table = Table(title="stages", title_justify="left")
    for col in ("stage", "status", "steps", "wall s", "last metrics"):
        table.add_column(col, justify="right" if col in ("steps", "wall s") else "left")
    partial = False
    for e in data["stages"]:
        of = f" of {e['total_steps']}" if e["total_steps"] is not None else ""
        if e["status"] == "done":
            status, steps = "[green]done[/]", e["step"]
        elif e["status"] == "partial":
            partial = True
            status, steps = f"[yellow]partial at step {e['step']}{of}[/]", e["logged_step"]
        else:
            status, steps = "[dim]not started[/]", None
        shown = ", ".join(f"{k} {fmt_value(v)}" for k, v in e["metrics"].items())
        wall = f"{e['wall_s']:.0f}" if isinstance(e["wall_s"], (int, float)) else ""
        table.add_row(esc(e["stage"]), status, "" if steps is None else str(steps), wall, esc(shown))
    console.print(table)
    if partial:
        console.print(
            "[dim]partial: the step of its last checkpoint, where the pipeline resumes; steps: the last step logged[/]"
        )
    if not any(e["logged"] for e in data["stages"]):
        console.print(f"[dim]no metrics logged yet ({esc(data['path'])}/metrics.jsonl)[/]", highlight=False)

    # attention entropy, a row per stage
    ent = data["attention_entropy"]
    if ent["stages"]:
        layers = ent["layers"]
        t = Table(title="attention entropy, nats (normalised: H / log(keys seen))", title_justify="left")
        t.add_column("stage")
        for label, _ in ENTROPY_SUMMARY:
            t.add_column(label, justify="right")
        if layers:
            t.add_column(f"by layer, L{layers[0]}..L{layers[-1]}")
        for stage, row in ent["stages"].items():
            cells = [_num(row.get(key)) for _, key in ENTROPY_SUMMARY]
            if layers:
                cells.append(" ".join(_num(row.get(f"attn_entropy/L{i}"), ".2f") for i in layers))
            t.add_row(esc(stage), *cells)
        console.print(t)

    # the evaluations: every accuracy beside its baselines
    evals = [e for e in data["evals"] if "error" not in e]
    for e in data["evals"]:
        if "error" in e:
            console.print(f"[yellow]eval/{esc(e['file'])}: {esc(e['error'])}[/]", highlight=False)
    if not evals:
        console.print("[dim]no eval files yet (eval/*.json): nanorl eval --checkpoint RUN[/]")
        return
    t = Table(title="evaluation (accuracy with its 95% Wilson CI and baselines)", title_justify="left")
    numbers = ("n", "accuracy", "95% CI", "chance", "majority", "format")
    for col in ("file", "model", "mode", "n", "accuracy", "95% CI", "chance", "majority", "beats majority", "format"):
        # numbers whole, right-aligned; in a narrow terminal the names wrap instead
        t.add_column(col, justify="right" if col in numbers else "left", no_wrap=col in numbers)
    for e in evals:
        for mode, s in e["modes"].items():
            ci = s.get("accuracy_ci95") or [None, None]
            beats = s.get("beats_majority")
            t.add_row(
                esc(e["file"]), esc(str(e["stage"] or "-")), esc(mode), str(s.get("n", "-")), _num(s.get("accuracy")),
                f"{_num(ci[0])}-{_num(ci[1])}", _num(s.get("chance_baseline")), _num(s.get("majority_baseline")),
                "-" if beats is None else ("[green]yes[/]" if beats else "no"), _num(s.get("format_rate")),
            )  # fmt: skip
    console.print(t)
    sampled = [(e, e["modes"]["sampled"]) for e in evals if "sampled" in e["modes"]]
    if sampled:
        t = Table(title="sampled mode (k completions per question; accuracy = pass@1)", title_justify="left")
        for col in ("file", "model", "k", "temperature", "pass@1", "pass@k", "maj@k"):
            t.add_column(
                col, justify="left" if col in ("file", "model") else "right", no_wrap=col not in ("file", "model")
            )
        for e, s in sampled:
            t.add_row(
                esc(e["file"]), esc(str(e["stage"] or "-")), str(s.get("samples", "-")),
                _num(s.get("temperature"), "g"), _num(s.get("accuracy")), _num(s.get("pass_at_k")),
                _num(s.get("maj_at_k")),
            )  # fmt: skip
        console.print(t)
    compares = [(e, mode, c) for e in evals for mode, c in e["compare"].items() if isinstance(c, dict)]
    if compares:
        t = Table(title="paired comparison on the same questions (a - b)", title_justify="left")
        for col in ("file", "mode", "a", "b", "acc a", "acc b", "diff", "95% CI", "p", "test"):
            t.add_column(col, justify="right" if col in ("acc a", "acc b", "diff", "p") else "left", no_wrap=col == "p")

        def model(path) -> str:  # a checkpoint's path (`nanorl eval --compare`) as RUN/STAGE: 80 columns are few
            return "/".join(Path(str(path)).parts[-2:])

        for e, mode, c in compares:
            lo, hi = c.get("diff_ci95") or [None, None]
            t.add_row(
                esc(e["file"]), esc(mode), esc(model(c.get("a"))), esc(model(c.get("b"))), _num(c.get("accuracy_a")),
                _num(c.get("accuracy_b")), _num(c.get("diff"), "+.3f"), f"{_num(lo, '+.3f')} to {_num(hi, '+.3f')}",
                _num(c.get("p_value"), ".3g"), paired_test_name(c),
            )  # fmt: skip
        console.print(t)
    report = Path(data["path"]) / "report.md"
    if report.is_file():
        console.print(f"[dim]report: {esc(str(report))}[/]", highlight=False)


def list_store(url: str, as_json: bool) -> None:
    """`runs list URL`: the runs a store holds (a folder with run.toml), the stages each finished, and those with
    a checkpoint but no DONE (in progress, or stopped)."""
    from nanorl.store import open_store
    from nanorl.store.runs import list_runs

    url = url.rstrip("/")
    store = open_store(url)
    store.check()  # an unreachable store: one line saying what to fix, in seconds
    rows = [{**r, "url": f"{url}/{r['name']}"} for r in list_runs(store)]
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print(f"no runs in {esc(url)}", highlight=False)
        console.print("[dim]a run gets there with checkpoint.store=URL, or nanorl runs push RUN URL[/]")
        return
    table = Table(title=f"{len(rows)} run(s) in {esc(url)}", title_justify="left")
    for col in ("run", "done up to", "partial", "files"):
        table.add_column(col, justify="right" if col == "files" else "left")
    for r in rows:
        table.add_row(
            esc(r["name"]), r["done"][-1] if r["done"] else "-", ", ".join(r["partial"]) or "-", str(r["files"])
        )
    console.print(table)
    u = esc(url)
    console.print(f"[dim]nanorl runs pull {u}/RUN    nanorl eval --checkpoint {u}/RUN[/]", highlight=False)


def register(app: typer.Typer) -> None:
    runs = typer.Typer(help="List runs, show one, and push or pull them to and from a store (S3 or a folder).")
    app.add_typer(runs, name="runs")

    @runs.command("list")
    def list_(
        url: str = typer.Argument(None, help="A store (s3://bucket/prefix or a folder): list the runs in it."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Every run in $NANORL_HOME/runs: task, model, stages done, final accuracy, size (or, given a store, the
        runs there: stages done and partial)."""
        import time

        from nanorl.config import nanorl_home

        if url:
            list_store(url, as_json)
            return
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

    @runs.command("show")
    def show(
        run: str = typer.Argument(..., help="A run name in $NANORL_HOME/runs, or a run folder's path."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """One run at a glance: its model, each stage's status and last metrics, every eval file's accuracy with
        its baselines, the paired comparisons, attention entropy by stage (the data report.md is built from)."""
        from nanorl.report import run_overview

        data = run_overview(locate_run(run))
        if as_json:
            print_json(data)
            return
        show_run(data)

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
        store = open_store(url)
        store.check()
        from nanorl.runlock import holder

        who = holder(d)
        if who is not None:  # what it sends is a snapshot: a checkpoint may change while it goes
            print_warning(
                f"run {name!r} is training now ({who}): this pushes a snapshot of it; checkpoint.store={url}"
                " in its command mirrors it as it trains"
            )
        with console.status(f"uploading {esc(str(d))}..."):
            sent = push_run(d, store, name)
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
        force: bool = typer.Option(False, "--force", help="Replace a local run of that name."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Download a run into $NANORL_HOME/runs: then eval, report, resume or train more as if it ran here."""
        import shutil
        import tempfile

        from nanorl.api import NanorlError
        from nanorl.config import run_dir
        from nanorl.store.runs import pull_run

        store, remote, stage, store_url = _store_and_name(url)
        if stage is not None:
            raise NanorlError(
                f"{url!r} names a stage: pull the run", hint=url.rstrip("/").rpartition("/")[0], exit_code=2
            )
        d = run_dir(name or remote)
        if d.exists() and any(d.iterdir()) and not force:
            raise NanorlError(
                f"a run {d.name!r} exists here ({d})",
                hint="--name OTHER to pull beside it, or --force to replace it",
                exit_code=2,
            )
        left_out = []

        def leave_out(folder: str, why: str) -> None:
            left_out.append(folder)
            print_warning(
                f"the {folder} checkpoint in the store is not whole ({why}): left out, so the run resumes {folder}"
                " from its start (if a run is uploading it now, pull again in a minute)"
            )

        # into a folder of its own first, then in place of the local run: a failed pull leaves no half run, and
        # --force leaves none of the old run's files (its later stages' DONE markers) beside the pulled ones
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".pull-{d.name}-", dir=d.parent))
        try:
            with console.status(f"downloading {esc(remote)} from {esc(store_url)}..."):
                got = pull_run(store, remote, tmp / "new", where=store_url, left_out=leave_out)
            if d.exists():
                _refuse_if_running(d)
                d.rename(tmp / "old")
            (tmp / "new").rename(d)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if as_json:
            print_json({"run": d.name, "path": str(d), "files": got, "left_out": left_out})
            return
        mb = sum((d / f).stat().st_size for f in got) / 1e6
        console.print(f"pulled {len(got)} files ({mb:.1f} MB) into {esc(str(d))}", highlight=False)
        console.print(f"[dim]nanorl eval --checkpoint {esc(d.name)}    nanorl runs list[/]", highlight=False)


def _refuse_if_running(d: Path) -> None:
    """A NanorlError when a process runs the run in `d` now (it holds `run.lock`: `nanorl.runlock`)."""
    from nanorl.api import NanorlError
    from nanorl.runlock import holder

    who = holder(d)
    if who is not None:
        raise NanorlError(
            f"run {d.name!r} is in use by {who}",
            hint="wait for it to end, or stop it, then pull again; or --name OTHER to pull beside it",
        )
