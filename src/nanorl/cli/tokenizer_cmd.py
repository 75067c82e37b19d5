"""`nanorl tokenizer train | info | encode`: train a run's BPE, inspect it, see how it splits text.

Which tokenizer, for all three: `--run NAME` (a run's: $NANORL_HOME/runs/NAME/tokenizer), `--dir/--out DIR` (a
folder of your own), or neither: $NANORL_HOME/tokenizer, a scratch tokenizer that belongs to no run. Training with
`--run` marks the run's tokenizer stage done, so `nanorl pipeline --name NAME` uses it instead of training its own.
"""

from __future__ import annotations

from pathlib import Path

import typer

from nanorl.cli.config_cmd import ConfigOpt, OverridesArg, PresetOpt, TaskOpt
from nanorl.cli.ui import Table, console, print_json

RunOpt = typer.Option(None, "--run", help="A run's tokenizer: $NANORL_HOME/runs/<run>/tokenizer.")
DirOpt = typer.Option(
    None, "--dir", "--out", help="A tokenizer folder of your own (default, without --run: $NANORL_HOME/tokenizer)."
)


def _where(run: str | None, directory: Path | None) -> tuple[Path, str]:
    """(folder, kind): kind is "run", "dir" or "scratch" (neither --run nor --dir given)."""
    from nanorl.api import NanorlError
    from nanorl.config import check_run_name
    from nanorl.data.prepare import scratch_tokenizer_dir, tokenizer_dir

    if run and directory is not None:
        raise NanorlError("give --run or --dir/--out, not both", hint="--run NAME: a run's tokenizer", exit_code=2)
    if directory is not None:
        return directory, "dir"
    if run:
        try:
            return tokenizer_dir(check_run_name(run)), "run"
        except NanorlError as e:
            e.hint = "`nanorl runs list` lists the runs"
            raise
    return scratch_tokenizer_dir(), "scratch"


def _load(run: str | None, directory: Path | None):
    """(tokenizer, its folder), or a NanorlError that says how to make the one asked for."""
    from nanorl.api import NanorlError
    from nanorl.config import run_dir
    from nanorl.tokenizer import FILE, Tokenizer

    folder, kind = _where(run, directory)
    if not (folder / FILE).is_file():
        if kind == "run" and not (run_dir(run) / "run.toml").is_file() and not folder.is_dir():
            raise NanorlError(
                f"no run named {run!r} ({run_dir(run)} has no run.toml and no tokenizer)",
                hint=f"`nanorl runs list` lists the runs; `nanorl tokenizer train --run {run}` trains a tokenizer"
                f" for it, `nanorl pipeline --name {run}` the whole run",
                exit_code=2,
            )
        if kind == "run":
            raise NanorlError(
                f"run {run!r} has no tokenizer yet (no {folder / FILE})",
                hint=f"train it with `nanorl tokenizer train --run {run}`, or run the pipeline with --name {run}",
                exit_code=2,
            )
        if kind == "dir" and folder.exists() and not folder.is_dir():
            raise NanorlError(
                f"--dir {folder} is a file, not a tokenizer's folder",
                hint="give the folder `nanorl tokenizer train --out DIR` saved it into",
                exit_code=2,
            )
        if kind == "dir":
            raise NanorlError(
                f"no tokenizer in {folder}",
                hint=f"train one there with `nanorl tokenizer train --out {folder}`",
                exit_code=2,
            )
        raise NanorlError(
            f"no tokenizer at {folder} (where `nanorl tokenizer train` without --run or --out saves one)",
            hint="give --run NAME for a run's tokenizer or --dir DIR for a folder, or train one with"
            " `nanorl tokenizer train --corpus SPEC`",
            exit_code=2,
        )
    return Tokenizer.load(folder), folder


def _measure_on(tok, run: str | None, corpus: str | None, task: str | None) -> tuple[str, str, str | None]:
    """(corpus spec, task name, task data folder) to measure compression on: --corpus, else what the tokenizer was
    trained on (it records it), else the run's data.corpus (its run.toml), else the task's own text; the task:
    --task, else the recorded one, else the run's, else the default; the folder: the run's data.data_dir."""
    from nanorl.config import RunConfig, from_toml_file, run_dir
    from nanorl.data.prepare import recorded_corpus

    rec_spec, rec_task = recorded_corpus(tok.meta)
    toml = run_dir(run) / "run.toml" if run else None
    cfg = from_toml_file(toml) if toml is not None and toml.is_file() else None
    spec = corpus or rec_spec or (cfg.data.corpus if cfg else None) or "task"
    task_name = task or rec_task or (cfg.task if cfg else None) or RunConfig().task
    return spec, task_name, (cfg.data.data_dir or None) if cfg else None


def _run_config(run: str | None, preset, config, task, overrides, flags: dict):
    """The config a tokenizer is trained with: an existing run's run.toml with the overrides and flags on top, or
    (a new run, a folder, the scratch tokenizer) defaults -> --preset -> --config -> overrides -> flags."""
    from nanorl.api import NanorlError
    from nanorl.config import from_toml_file, parse_overrides, resolve, run_dir, set_value, validate

    toml = run_dir(run) / "run.toml" if run else None
    if toml is None or not toml.is_file():
        return resolve(preset=preset, config_file=config, overrides=overrides or [], task=task, name=run, **flags)
    if preset or config:
        raise NanorlError(
            f"run {run!r} exists, and its config is its run.toml ({toml})",
            hint="leave out --preset and --config; change a setting with key=value (e.g. tokenizer.max_digits=3)",
            exit_code=2,
        )
    cfg = from_toml_file(toml)
    pairs = parse_overrides(overrides or []) + [(k.replace("__", "."), v) for k, v in flags.items() if v is not None]
    for k, v in pairs + ([("task", task)] if task else []):
        set_value(cfg, k, v)
    validate(cfg)
    return cfg


def register(app: typer.Typer) -> None:
    tok_app = typer.Typer(help="Train and inspect the BPE tokenizer.", no_args_is_help=True)
    app.add_typer(tok_app, name="tokenizer")

    @tok_app.command("train")
    def train(
        overrides: list[str] = OverridesArg,
        vocab_size: int = typer.Option(None, "--vocab-size", help="Vocabulary size, special tokens included."),
        corpus: str = typer.Option(None, "--corpus", help="task, fineweb, or files (path, directory, glob)."),
        max_chars: int = typer.Option(None, "--max-chars", help="Train on at most this many characters."),
        run: str = typer.Option(
            None,
            "--run",
            help="Train this run's tokenizer (runs/<run>/tokenizer, from its run.toml when the run exists) and mark"
            " the run's tokenizer stage done: `nanorl pipeline --name <run>` then uses it.",
        ),
        directory: Path = typer.Option(
            None, "--out", "--dir", help="Save into this folder instead (no run's; default: $NANORL_HOME/tokenizer)."
        ),
        preset: str = PresetOpt,
        config: Path = ConfigOpt,
        task: str = TaskOpt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Train a byte-level BPE on a corpus (data.corpus).

        Where it goes: --run NAME, the run's tokenizer (its stage marked done, so the pipeline uses it; an
        existing run's settings come from its run.toml); --out DIR, a folder of your own; neither,
        $NANORL_HOME/tokenizer, a scratch tokenizer no run uses (`tokenizer info` and `encode` read it by default).
        """
        import time

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from nanorl import checkpoint as ckpt
        from nanorl.data.prepare import open_run_corpus, train_run_tokenizer
        from nanorl.plugins import get_plugins
        from nanorl.tokenizer import FILE, Tokenizer

        out, kind = _where(run, directory)
        flags = {"model__vocab_size": vocab_size, "data__corpus": corpus, "tokenizer__train_chars": max_chars}
        cfg = _run_config(run, preset, config, task, overrides, flags)
        the_task = get_plugins().task(cfg.task) if cfg.data.corpus == "task" else None
        before = Tokenizer.load(out).fingerprint if kind == "run" and (out / FILE).is_file() else None
        open_run_corpus(cfg, the_task, console=None if as_json else console)  # FineWeb shards fetched first
        t0 = time.perf_counter()
        with Progress(
            TextColumn("[bold]training BPE[/]"),
            BarColumn(),
            TextColumn("{task.completed:,.0f} chars"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=as_json or not console.is_terminal,  # in a pipe a bar draws nothing but an empty line
        ) as bar:
            job = bar.add_task("train", total=None)
            tok = train_run_tokenizer(cfg, the_task, out, on_chars=lambda n: bar.advance(job, n))
        seconds = time.perf_counter() - t0
        stale: list[str] = []
        if kind == "run":
            # the pipeline's tokenizer stage is done: `nanorl pipeline --name RUN` uses this one, not a new one
            ckpt.mark_done(out, info={"vocab_size": tok.vocab_size, "seconds": seconds, "corpus": tok.meta["corpus"]})
            if before is not None and before != tok.fingerprint:
                stale = [s for s in ("base", "mid", "sft", "rl") if ckpt.has_checkpoint(out.parent / s)]
        result = {**tok.info, "path": str(out), "seconds": round(seconds, 2)}
        result["train_mb_per_s"] = round(tok.meta["trained_chars"] / 1e6 / max(seconds, 1e-9), 2)
        result["run"] = run if kind == "run" else None
        result["stale_models"] = stale
        if as_json:
            result.pop("special_tokens")
            print_json(result)
            return
        console.print(
            f"[green]tokenizer saved[/] to {out}: vocab {tok.vocab_size} ({tok.info['merges']} merges + 256 bytes + "
            f"{len(tok.specials)} special), trained on {tok.meta['trained_chars']:,} chars of {tok.meta['corpus']} "
            f"in {seconds:.1f} s"
        )
        if kind == "run":
            console.print(f"[dim]run {run}: the tokenizer stage is done; `nanorl pipeline --name {run}` uses it[/]")
        elif kind == "scratch":
            console.print(
                "[dim]a scratch tokenizer, no run's: `nanorl tokenizer info` and `encode` read it; "
                "`--run NAME` trains a run's[/]"
            )
        if stale:
            console.print(
                f"[yellow]note:[/] run {run}'s {', '.join(stale)} models were trained with the previous tokenizer and"
                f" will be refused; retrain them with `nanorl pipeline --name {run} --from base`"
            )
        if tok.vocab_size < cfg.model.vocab_size:
            console.print(
                f"[yellow]note:[/] the corpus ran out of pairs to merge before {cfg.model.vocab_size} tokens "
                "(every word is already one token)"
            )

    @tok_app.command("info")
    def info(
        run: str = RunOpt,
        directory: Path = DirOpt,
        corpus: str = typer.Option(
            None, "--corpus", help="Measure compression on this corpus (default: what the tokenizer was trained on)."
        ),
        task: str = typer.Option(None, "--task", help="The task whose dev split to measure on (corpus 'task')."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Vocabulary, special tokens, and compression (bytes per token) on a held-out sample of the text the
        tokenizer was trained on (its recorded corpus, else the run's data.corpus; --corpus to choose)."""
        from nanorl.api import NanorlError
        from nanorl.data.prepare import held_out_sample
        from nanorl.plugins import get_plugins

        tok, folder = _load(run, directory)
        spec, task_name, data_dir = _measure_on(tok, run, corpus, task)
        the_task = get_plugins().task(task_name) if spec == "task" else None
        try:
            sample, what = held_out_sample(spec, the_task, data_dir=data_dir)
        except NanorlError as e:
            raise NanorlError(
                f"cannot measure compression on {spec!r}: {e.message}",
                hint="give --corpus SPEC (task, fineweb, or files) to measure on other text",
                exit_code=e.exit_code,
            ) from None
        result = {**tok.info, "bytes_per_token": round(tok.bytes_per_token(sample), 3), "measured_on": what}
        if as_json:
            print_json(result)
            return
        from rich.markup import escape

        table = Table(title=f"tokenizer: {folder}", title_justify="left", show_header=False)
        table.add_column("key", style="cyan")
        table.add_column("value", overflow="fold")
        for k, v in result.items():
            if k == "special_tokens":
                v = ", ".join(f"{name} {i}" for name, i in v.items())
            table.add_row(k, escape(f"{v:,}" if isinstance(v, int) else str(v)))  # the pattern has [...]
        console.print(table)

    @tok_app.command("encode")
    def encode(
        text: str = typer.Argument(..., help="The text to encode."),
        run: str = RunOpt,
        directory: Path = DirOpt,
        as_json: bool = typer.Option(False, "--json", help="Print the ids as JSON."),
    ) -> None:
        """Show how TEXT splits into tokens (alternating colours) and their ids."""
        from rich.text import Text

        tok, _ = _load(run, directory)
        ids = tok.encode(text)
        if as_json:
            # "tokens" as text (a piece of a character shows as U+FFFD); "bytes" exactly, in hex
            print_json(
                {"ids": ids, "tokens": [tok.decode([i]) for i in ids], "bytes": [tok.token_bytes(i).hex() for i in ids]}
            )
            return
        colours = ("black on cyan", "black on yellow", "black on green", "black on magenta")
        shown = Text()
        for n, i in enumerate(ids):
            shown.append(tok.token_bytes(i).decode("utf-8", errors="replace"), style=colours[n % len(colours)])
        console.print(shown)
        console.print(f"[dim]{len(ids)} tokens, {len(text.encode('utf-8')) / max(1, len(ids)):.2f} bytes/token[/]")
        console.print(" ".join(str(i) for i in ids), highlight=False)
