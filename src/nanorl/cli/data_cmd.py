"""`nanorl data download fineweb` and `nanorl data show`: get pretraining shards, look at a task's examples."""

from __future__ import annotations

from pathlib import Path

import typer

from nanorl.cli.ui import console, esc, print_json


def register(app: typer.Typer) -> None:
    data_app = typer.Typer(help="Download pretraining data and preview task data.", no_args_is_help=True)
    app.add_typer(data_app, name="data")
    download_app = typer.Typer(help="Download a pretraining corpus.", no_args_is_help=True)
    data_app.add_typer(download_app, name="download")

    @download_app.command("fineweb")
    def fineweb(
        shards: int = typer.Option(8, "--shards", "-n", help="How many shards (~100 MB each).", min=1),
        start: int = typer.Option(0, "--start", help="Index of the first shard.", min=0),
        url: str = typer.Option(None, "--url", help="Base URL (default: $NANORL_FINEWEB_URL, else the HF hub)."),
        directory: Path = typer.Option(None, "--dir", help="Where to put them (default: $NANORL_HOME/data/fineweb)."),
        workers: int = typer.Option(4, "--workers", help="Parallel downloads.", min=1),
        retries: int = typer.Option(5, "--retries", help="Retries per shard, with exponential backoff.", min=0),
        as_json: bool = typer.Option(False, "--json", help="Print JSON when done."),
    ) -> None:
        """Download FineWeb-EDU parquet shards: parallel, resumable, each checked before use."""
        from nanorl.data.fineweb import fineweb_dir
        from nanorl.data.prepare import download_with_progress

        # the folder first: one that cannot be made (a file in the way, no permission) is an error before any bar
        where = directory or fineweb_dir()
        where.mkdir(parents=True, exist_ok=True)
        paths = download_with_progress(
            shards, console, disable=as_json, base_url=url, directory=directory, workers=workers, retries=retries,
            start=start,
        )  # fmt: skip
        total = sum(p.stat().st_size for p in paths)
        if as_json:
            print_json({"shards": [str(p) for p in paths], "bytes": total})
        else:
            mb = f"{total / 1e6:,.0f} MB"
            console.print(f"[green]{len(paths)} shards[/] ({mb}) in {esc(str(where))}", highlight=False)

    @data_app.command("show")
    def show(
        task: str = typer.Option("arith", "--task", help="The task."),
        split: str = typer.Option("dev", "--split", help="train, dev or test."),
        n: int = typer.Option(3, "-n", help="How many examples.", min=0),
        data_dir: str = typer.Option(None, "--data-dir", help="The task's data folder, if it needs one."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Preview a task's examples: question, options, rationale (the SFT target) and the answer."""
        from nanorl.plugins import get_plugins

        t = get_plugins().task(task)
        examples = t.load(split, data_dir)
        shown = examples[:n]
        if as_json:
            print_json(
                {
                    "task": task,
                    "split": split,
                    "size": len(examples),
                    "examples": [
                        {
                            "id": e.id,
                            "question": e.question,
                            "options": e.options,
                            "target": t.target(e),
                            "answer": e.answer,
                        }
                        for e in shown
                    ],
                }
            )
            return
        from rich.panel import Panel
        from rich.text import Text

        console.print(f"[bold]{esc(task)}[/] {esc(split)}: {len(examples):,} examples")
        for e in shown:
            # Text, not markup: a question may contain "[" that rich would read as a style
            body = Text(e.question + ("\n" + "  ".join(e.options) if e.options else "") + "\n")
            body.append("---\n", style="dim")
            _append_target(body, t.target(e))
            body.append("\n")
            body.append("answer: ", style="dim")
            body.append(e.answer, style="bold")
            # in a pipe the console is wide (ui.PIPE_WIDTH): a panel there fits its text instead of filling it
            console.print(Panel(body, title=esc(e.id), title_align="left", expand=console.is_terminal))


# how a target's tool parts show: the special tokens the model writes around them, dimmed, and the contents
_PART_STYLE = {
    "python": ("<|python_start|>", "<|python_end|>", "cyan"),
    "python_output": ("<|output_start|>", "<|output_end|>", "green"),
}


def _append_target(body, target) -> None:
    """The SFT target into a rich Text: a string as it is; content parts (a tool-using target, e.g. GSM8K's
    calculator calls) as the model sees them, with the tool's tokens dimmed."""
    if isinstance(target, str):
        body.append(target)
        return
    for part in target:
        if part["type"] not in _PART_STYLE:
            body.append(part["text"])
            continue
        start, end, style = _PART_STYLE[part["type"]]
        body.append(start, style="dim")
        body.append(part["text"], style=style)
        body.append(end, style="dim")
