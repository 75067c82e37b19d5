"""`nanorl eval`: evaluate a checkpoint on a task's dev or test split (generative and/or categorical)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import typer

from nanorl.cli.config_cmd import DataDirOpt
from nanorl.cli.ui import Table, console, err_console, esc, print_json

# Options are module-level so that other commands (and later flags such as --compare) can reuse them.
SplitOpt = typer.Option("dev", "--split", help="dev, test, train, or validation (dev's other name).")
ModeOpt = typer.Option("generative", "--mode", help="generative, categorical or both.")
CompileOpt = typer.Option(
    None, "--compile/--no-compile", help="Compile the CPU decode step (default: the run's engine.compile)."
)


@contextlib.contextmanager
def eval_progress(disable: bool):
    """A progress bar per evaluated mode (questions done, completion tokens/s, ETA) on stderr, cleared when done;
    yields `evaluate`'s `progress` argument for a checkpoint label: label -> mode -> callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold cyan]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
    )  # fmt: skip
    # only in a terminal: in a pipe or a file a bar draws nothing, but leaves an empty line
    with Progress(*columns, console=err_console, transient=True, disable=disable or not err_console.is_terminal) as bar:

        def for_checkpoint(label: str):
            def for_mode(mode: str):
                job, t0 = bar.add_task(f"{label} {mode}", total=None, rate=""), time.time()

                def update(done: int, total: int, tokens: int) -> None:
                    rate = f"{tokens / max(time.time() - t0, 1e-9):,.0f} tok/s"
                    bar.update(job, completed=done, total=total, rate=rate)

                return update

            return for_mode

        yield for_checkpoint


def locate_checkpoint(checkpoint: str) -> Path:
    """The stage folder of a checkpoint (a run name, RUN/STAGE, a stage folder, or an s3:// URL, downloaded into a
    temporary folder that lives until the process exits: the run's tokenizer is read from it later), inside a
    run folder with its run.toml."""
    from nanorl.api import NanorlError
    from nanorl.cli.train_cmd import resolve_checkpoint

    workdir = None
    if checkpoint.startswith("s3://"):
        import atexit
        import shutil
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix="nanorl-eval-"))
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    stage_dir = resolve_checkpoint(checkpoint, workdir)
    toml = stage_dir.parent / "run.toml"
    if not toml.is_file():
        raise NanorlError(
            f"{stage_dir} is not inside a run folder (no {toml})", hint="give runs/<name>/<stage>", exit_code=2
        )
    return stage_dir


def load_for_eval(
    checkpoint: str | Path, task: str | None, data_dir: str | None = None, compile_: bool | None = None,
    eval_overrides: dict | None = None,
):  # fmt: skip
    """(context, model, stage folder) for a checkpoint (`locate_checkpoint`'s spec, or the stage folder it found).
    `compile_` (not None) overrides the run's engine.compile; `eval_overrides` the eval fields given (not None)."""
    from nanorl.stages.runner import make_context, read_run_config

    stage_dir = checkpoint if isinstance(checkpoint, Path) else locate_checkpoint(checkpoint)
    run = stage_dir.parent
    cfg = read_run_config(run / "run.toml")
    cfg.name = run.name
    if task:
        cfg.task = task
    if data_dir:
        cfg.data.data_dir = data_dir
    if compile_ is not None:
        cfg.engine.compile = compile_
    for key, value in (eval_overrides or {}).items():
        if value is not None:
            setattr(cfg.eval, key, value)
    cfg.telemetry.console = False
    if not task:  # the run's own task: its plugin may not be installed here
        from nanorl.api import NanorlError
        from nanorl.plugins import get_plugins

        try:
            get_plugins().task(cfg.task)
        except NanorlError as e:
            raise NanorlError(
                f"run {run.name} was trained on task {cfg.task!r}, and {e.message}",
                hint=f"install the plugin that provides {cfg.task!r} (`nanorl plugins list` shows what is installed;"
                " NANORL_PLUGINS may leave it out), or evaluate on another task with --task T",
                exit_code=2,
            ) from None
    ctx = make_context(cfg, folder=run)
    from nanorl.device import together

    model = together(ctx.new_model)  # (under torchrun a rank that cannot read the tokenizer stops every rank)
    together(ctx.load_checkpoint, stage_dir, model)  # the architecture and the run's tokenizer checked
    return ctx, model, stage_dir


def compare_checkpoints(
    res, other: str | Path, task: str, split: str, mode: str, max_examples: int, seed: int, data_dir: str | None = None,
    compile_: bool | None = None, eval_overrides: dict | None = None, progress=None,
):  # fmt: skip
    """`--compare OTHER` (a spec, or the stage folder `locate_checkpoint` found): evaluate OTHER on the same
    questions; per mode, the paired difference and its p (`nanorl.multichoice.compare`; a = the checkpoint
    evaluated, b = OTHER)."""
    from nanorl.api import NanorlError
    from nanorl.multichoice import compare
    from nanorl.stages.eval import evaluate

    ctx, model, stage_dir = load_for_eval(other, task, data_dir, compile_, eval_overrides)
    try:
        res_b = evaluate(
            ctx, model, split, mode, max_examples, seed=seed, progress=progress and progress(stage_dir.name)
        )
    finally:
        ctx.bus.close()
    out = {}
    for m, s in res["modes"].items():
        if m not in res_b["modes"]:
            continue
        try:
            out[m] = {
                "a": res["checkpoint"],
                "b": str(stage_dir),
                **compare(s["records"], res_b["modes"][m]["records"]),
            }
        except ValueError as e:
            raise NanorlError(
                f"--compare {other}: {e}", hint="compare checkpoints on the same task, split and --max-examples"
            ) from e
    return out


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        task: str = typer.Option(None, "--task", help="The task (default: the run's)."),
        split: str = SplitOpt,
        checkpoint: str = typer.Option(
            ...,
            "--checkpoint",
            help="A run name (its final model), RUN/STAGE, a stage folder, or s3://bucket/prefix/RUN\\[/STAGE].",
        ),
        mode: str = ModeOpt,
        max_examples: int = typer.Option(0, "--max-examples", min=0, help="Evaluate at most this many (0: all)."),
        data_dir: str = DataDirOpt,
        compare_to: str = typer.Option(
            None, "--compare", help="Another checkpoint, evaluated on the same questions: paired difference, McNemar p."
        ),
        shuffle_k: int = typer.Option(
            0, "--shuffle-options", help="Re-ask each question with its options permuted K times (position bias)."
        ),
        samples: int = typer.Option(
            None,
            "--samples",
            help="Also sample K completions per question: pass@1, pass@K, maj@K (default: the run's eval.samples).",
        ),
        sample_temperature: float = typer.Option(
            None, "--sample-temperature", help="Temperature of --samples (default: the run's eval.sample_temperature)."
        ),
        sample_top_k: int = typer.Option(
            None, "--sample-top-k", help="Top-k of --samples, 0 for every token (default: the run's eval.sample_top_k)."
        ),
        compile_: bool = CompileOpt,
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Evaluate a checkpoint and write eval/<task>-<split>-<stage>.json in its run folder, telemetry hooks told
        as by the eval stage (not for a run in a store: pull it first to keep the file). Under torchrun the ranks
        share the questions (as the eval stage does); rank 0 writes the file and prints the result."""
        from nanorl.api import NanorlError

        if mode not in ("generative", "categorical", "both"):
            raise NanorlError(
                f"--mode {mode!r}: generative, categorical or both", hint="--mode both runs the two", exit_code=2
            )
        if split not in ("dev", "test", "validation", "train"):
            raise NanorlError(
                f"--split {split!r}: dev, validation, test or train",
                hint="dev is what the pipeline evaluates; test is held out",
                exit_code=2,
            )
        from nanorl.stages.eval import evaluate, publish, split_label, write_json

        if shuffle_k < 0:
            raise NanorlError(
                f"--shuffle-options {shuffle_k}: give K >= 1 (0: off)", hint="e.g. --shuffle-options 3", exit_code=2
            )
        from nanorl.stages.eval import shuffle_check

        if samples is not None and samples < 0:
            raise NanorlError(f"--samples {samples}: give K >= 1 (0: off)", hint="e.g. --samples 8", exit_code=2)
        if sample_temperature is not None and sample_temperature <= 0:
            raise NanorlError(
                f"--sample-temperature {sample_temperature}: give T > 0",
                hint="e.g. --sample-temperature 0.7 (greedy answers are the generative mode's)",
                exit_code=2,
            )
        if sample_top_k is not None and sample_top_k < 0:
            raise NanorlError(
                f"--sample-top-k {sample_top_k}: give K >= 0 (0: every token)",
                hint="e.g. the run's rl.top_k",
                exit_code=2,
            )
        sampling = {"samples": samples, "sample_temperature": sample_temperature, "sample_top_k": sample_top_k}
        # both checkpoints found before either is evaluated: a typo in --compare fails at once
        try:
            other_dir = locate_checkpoint(compare_to) if compare_to else None
        except NanorlError as e:
            e.message = f"--compare: {e.message}"
            raise
        ctx, model, stage_dir = load_for_eval(checkpoint, task, data_dir, compile_, sampling)
        # a run pulled from a store for this command lives in a temporary folder: its file would not be kept
        kept = not checkpoint.startswith("s3://")
        if ctx.cfg.engine.compile and ctx.device.type == "cpu" and not as_json and ctx.rank == 0:
            console.print("[dim]compiling the decode step on first use: 20-40 s, once per process and batch layout[/]")
        lead = ctx.rank == 0  # under torchrun: the rank that shows and writes the result
        with eval_progress(disable=as_json or not lead) as progress:
            try:
                res = evaluate(ctx, model, split, mode, max_examples, ctx.cfg.seed, progress=progress(stage_dir.name))
                if shuffle_k:
                    shuffle_check(ctx, model, res, shuffle_k, seed=ctx.cfg.seed)
                res["stage"] = stage_dir.name
                res["checkpoint"] = str(stage_dir)
                if kept:  # through the run's metrics bus, as the eval stage's: metrics.jsonl and the hooks' on_eval,
                    # between a start and an end told to the hooks only (the wandb sink opens its run on the start)
                    info = ctx.info("eval", 1, f"the {stage_dir.name} model on {split} ({mode})")
                    ctx.bus.stage_start(info, record=False)
                    publish(ctx, "eval", res)
                    ctx.bus.stage_end(info, {}, record=False)
            finally:
                ctx.bus.close()
            if compare_to:
                del model  # one model in memory at a time
                other_task = task or ctx.task.name
                res["compare"] = compare_checkpoints(
                    res, other_dir, other_task, split, mode, max_examples, ctx.cfg.seed, data_dir, compile_,
                    sampling, progress,
                )  # fmt: skip
        from nanorl.device import dist_finished

        dist_finished()  # (under torchrun) every rank got here: the process group is left cleanly at exit
        if not lead:  # every rank holds the whole result: one writes the file and prints it
            return
        out = ctx.run_dir / "eval" / f"{ctx.task.name}-{split_label(split)}-{stage_dir.name}.json"
        if kept:
            write_json(out, res)
        if as_json:
            print_json(res)
            return
        table = Table(title=f"{ctx.task.name} {split}: {stage_dir}", title_justify="left")
        # a free-form task (GSM8K) has no chance level and no letter format: those cells show "-"
        for col in ("mode", "n", "accuracy", "95% CI", "chance", "majority", "format\nrate", "answered"):
            table.add_column(col, no_wrap=col != "mode")  # the numbers whole; a narrow terminal wraps the mode

        def cell(s: dict, key: str) -> str:
            return f"{s[key]:.3f}" if isinstance(s.get(key), (int, float)) else "-"

        for m, s in res["modes"].items():
            ci = s.get("accuracy_ci95", [0, 0])
            table.add_row(
                m, str(s["n"]), f"{s['accuracy']:.3f}", f"{ci[0]:.3f}-{ci[1]:.3f}", cell(s, "chance_baseline"),
                cell(s, "majority_baseline"), cell(s, "format_rate"), cell(s, "answered_rate"),
            )  # fmt: skip
        console.print(table)
        if "sampled" in res["modes"]:
            s = res["modes"]["sampled"]
            console.print(
                f"sampled: {s['samples']} completions per question at temperature {s['temperature']}; accuracy is"
                f" pass@1; pass@{s['samples']} {s['pass_at_k']:.3f}, maj@{s['samples']} {s['maj_at_k']:.3f}"
            )
        if res.get("compare"):
            t = Table(title=f"paired with {compare_to} (McNemar, exact; sampled: sign test)", title_justify="left")
            for col in ("mode", "n", "acc", "other", "diff", "95% CI", "this better", "other better", "p"):
                t.add_column(col, no_wrap=col not in ("mode", "95% CI", "this better", "other better"))
            for m, c in res["compare"].items():
                lo, hi = c["diff_ci95"]  # Tango's score interval: not symmetric about diff
                t.add_row(
                    m, str(c["n"]), f"{c['accuracy_a']:.3f}", f"{c['accuracy_b']:.3f}", f"{c['diff']:+.3f}",
                    f"{lo:+.3f} to {hi:+.3f}",
                    str(c["a_only"]), str(c["b_only"]), f"{c['p_value']:.3g}",
                )  # fmt: skip
            console.print(t)
        if shuffle_k:
            t = Table(title=f"options shuffled {shuffle_k} times (position bias)", title_justify="left")
            t.add_column("mode", no_wrap=True)
            for col in ("asked", "accuracy", "95% CI", "same content", "same letter"):
                t.add_column(col)
            for m, s in res["modes"].items():
                if "shuffle" not in s:  # the sampled mode is not re-asked
                    continue
                sh = s["shuffle"]
                lo, hi = sh["shuffled_accuracy_ci95"]
                t.add_row(
                    m, str(sh["shuffled_n"]), f"{sh['shuffled_accuracy']:.3f}", f"{lo:.3f}-{hi:.3f}",
                    f"{sh['content_consistency']:.3f}", f"{sh['same_letter_rate']:.3f}",
                )  # fmt: skip
            console.print(t)
        if kept:
            console.print(f"[dim]written: {esc(str(out))}[/]")
        else:
            from nanorl.store.runs import split_url

            store_url, name, _ = split_url(checkpoint)
            pull = esc(f"nanorl runs pull {store_url}/{name}")
            console.print(f"[dim]no file written (the run is in a store): {pull}[/]")
