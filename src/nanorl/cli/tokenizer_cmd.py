"""`nanorl tokenizer train | info | encode`: train a run's BPE, inspect it, see how it splits text."""

from __future__ import annotations

from pathlib import Path

import typer

from nanorl.cli.config_cmd import ConfigOpt, OverridesArg, PresetOpt, TaskOpt, build_config
from nanorl.cli.ui import console, print_json

RunOpt = typer.Option(None, "--run", help="Run name: the tokenizer lives in $NANORL_HOME/runs/<run>/tokenizer.")
DirOpt = typer.Option(None, "--dir", "--out", help="A tokenizer folder instead of a run's.")


def _folder(cfg_name: str, directory: Path | None) -> Path:
    from nanorl.data.prepare import tokenizer_dir

    return directory if directory is not None else tokenizer_dir(cfg_name)


def _load(run: str | None, directory: Path | None, preset, config, task):
    from nanorl.tokenizer import Tokenizer

    cfg = build_config(preset, None, config, task, run, [])
    return Tokenizer.load(_folder(cfg.name, directory)), cfg


def register(app: typer.Typer) -> None:
    tok_app = typer.Typer(help="Train and inspect the BPE tokenizer.", no_args_is_help=True)
    app.add_typer(tok_app, name="tokenizer")

    @tok_app.command("train")
    def train(
        overrides: list[str] = OverridesArg,
        vocab_size: int = typer.Option(None, "--vocab-size", help="Vocabulary size, special tokens included."),
        corpus: str = typer.Option(None, "--corpus", help="task, fineweb, or files (path, directory, glob)."),
        max_chars: int = typer.Option(None, "--max-chars", help="Train on at most this many characters."),
        run: str = RunOpt,
        directory: Path = DirOpt,
        preset: str = PresetOpt,
        config: Path = ConfigOpt,
        task: str = TaskOpt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Train a byte-level BPE on the run's corpus and save it in the run folder (or --out DIR)."""
        import time

        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from nanorl.config import resolve
        from nanorl.data.prepare import train_run_tokenizer
        from nanorl.plugins import get_plugins

        cfg = resolve(
            preset=preset,
            config_file=config,
            overrides=overrides or [],
            task=task,
            name=run,
            model__vocab_size=vocab_size,
            data__corpus=corpus,
            tokenizer__train_chars=max_chars,
        )
        the_task = get_plugins().task(cfg.task) if cfg.data.corpus == "task" else None
        out = _folder(cfg.name, directory)
        t0 = time.perf_counter()
        with Progress(
            TextColumn("[bold]training BPE[/]"),
            BarColumn(),
            TextColumn("{task.completed:,.0f} chars"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=as_json,
        ) as bar:
            job = bar.add_task("train", total=None)
            tok = train_run_tokenizer(cfg, the_task, out, on_chars=lambda n: bar.advance(job, n))
        seconds = time.perf_counter() - t0
        result = {**tok.info, "path": str(out), "seconds": round(seconds, 2)}
        result["train_mb_per_s"] = round(tok.meta["trained_chars"] / 1e6 / max(seconds, 1e-9), 2)
        if as_json:
            result.pop("special_tokens")
            print_json(result)
            return
        console.print(
            f"[green]tokenizer saved[/] to {out}: vocab {tok.vocab_size} ({tok.info['merges']} merges + 256 bytes + "
            f"{len(tok.specials)} special), trained on {tok.meta['trained_chars']:,} chars of {tok.meta['corpus']} "
            f"in {seconds:.1f} s"
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
        corpus: str = typer.Option(None, "--corpus", help="Measure compression on this corpus (default: run's)."),
        preset: str = PresetOpt,
        config: Path = ConfigOpt,
        task: str = TaskOpt,
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Vocabulary, special tokens, and compression (bytes per token) on a held-out sample."""
        from nanorl.data.prepare import held_out_sample
        from nanorl.plugins import get_plugins

        tok, cfg = _load(run, directory, preset, config, task)
        spec = corpus or cfg.data.corpus
        the_task = get_plugins().task(cfg.task) if spec == "task" else None
        sample, what = held_out_sample(spec, the_task)
        result = {**tok.info, "bytes_per_token": round(tok.bytes_per_token(sample), 3), "measured_on": what}
        if as_json:
            print_json(result)
            return
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"tokenizer: {_folder(cfg.name, directory)}", title_justify="left", show_header=False)
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
        preset: str = PresetOpt,
        config: Path = ConfigOpt,
        task: str = TaskOpt,
        as_json: bool = typer.Option(False, "--json", help="Print the ids as JSON."),
    ) -> None:
        """Show how TEXT splits into tokens (alternating colours) and their ids."""
        from rich.text import Text

        tok, _ = _load(run, directory, preset, config, task)
        ids = tok.encode(text)
        if as_json:
            print_json({"ids": ids, "tokens": [tok.decode([i]) for i in ids]})
            return
        colours = ("black on cyan", "black on yellow", "black on green", "black on magenta")
        shown = Text()
        for n, i in enumerate(ids):
            shown.append(tok.token_bytes(i).decode("utf-8", errors="replace"), style=colours[n % len(colours)])
        console.print(shown)
        console.print(f"[dim]{len(ids)} tokens, {len(text.encode('utf-8')) / max(1, len(ids)):.2f} bytes/token[/]")
        console.print(" ".join(str(i) for i in ids), highlight=False)
