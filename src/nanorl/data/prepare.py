"""A run's tokenizer: trained on the run's corpus (`data.corpus`), saved in `runs/<name>/tokenizer/`.

One way to do it, shared by `nanorl tokenizer train` and the pipeline's tokenizer step. The tokenizer records
what it was trained on (`meta["corpus"]`: `task:<name>`, `fineweb`, or the files' spec with absolute paths), which
`nanorl tokenizer info` measures compression on.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from pathlib import Path

from nanorl.api import Task
from nanorl.config import RunConfig, nanorl_home, run_dir
from nanorl.data.corpus import open_corpus, task_corpus

# documents in the held-out sample that `nanorl tokenizer info` measures compression on
HELD_OUT_DOCS = 500


def tokenizer_dir(run_name: str) -> Path:
    return run_dir(run_name) / "tokenizer"


def scratch_tokenizer_dir() -> Path:
    """Where `nanorl tokenizer train` saves a tokenizer given neither --run nor --out (and `tokenizer info` and
    `encode` read one given neither --run nor --dir): $NANORL_HOME/tokenizer, no run's."""
    return nanorl_home() / "tokenizer"


def corpus_record(spec: str, corpus_name: str) -> str:
    """The corpus a tokenizer records: the corpus's name for a task (`task:<name>`) or FineWeb, else the spec
    with its paths made absolute (so that `tokenizer info` finds them from another directory)."""
    if spec in ("task", "fineweb"):
        return corpus_name
    parts = (p.strip() for p in spec.split(","))
    return ",".join(str(Path(p).expanduser().absolute()) for p in parts if p)


def recorded_corpus(meta: dict) -> tuple[str | None, str | None]:
    """(corpus spec, task name) from what a tokenizer recorded (`corpus_record`); (None, None) when nothing was."""
    rec = meta.get("corpus")
    if not isinstance(rec, str) or not rec:
        return None, None
    if rec.startswith("task:"):
        return "task", rec[len("task:") :]
    return rec, None


def download_with_progress(shards: int, console=None, disable: bool = False, **kwargs) -> list[Path]:
    """`download_fineweb(shards, **kwargs)` with a progress bar on `console` (bytes, MB/s, shards done), or, when
    `console` is not a terminal (a pipe, a log file: a bar would draw nothing there but an empty line), a line a
    shard; nothing when `disable` (e.g. --json). The one bar of `nanorl data download` and the pipeline's fetch."""
    import threading
    import time

    from rich import get_console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

    from nanorl.data.fineweb import download_fineweb

    console = console or get_console()
    lines = not disable and not console.is_terminal
    lock, done, got, t0 = threading.Lock(), [0], [0], time.perf_counter()  # the callbacks come from the threads
    columns = (
        TextColumn("[bold]fineweb[/] {task.fields[shards]}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=True, disable=disable or lines) as bar:
        job = bar.add_task("download", total=None, shards=f"0/{shards} shards")

        def on_bytes(n: int) -> None:
            with lock:
                got[0] += n
                bar.advance(job, n)

        def on_shard(_: Path) -> None:
            with lock:
                done[0] += 1
                bar.update(job, shards=f"{done[0]}/{shards} shards")
                if lines:
                    seconds = time.perf_counter() - t0
                    console.print(
                        f"fineweb: {done[0]}/{shards} shards, {got[0] / 1e6:,.0f} MB downloaded in {seconds:.0f} s"
                        f" ({got[0] / 1e6 / max(seconds, 1e-9):.1f} MB/s)",
                        highlight=False,
                    )

        return download_fineweb(shards, on_bytes=on_bytes, on_shard=on_shard, **kwargs)


def fetch_fineweb(shards: int, console=None) -> list[Path]:
    """Download whichever of FineWeb-EDU's first `shards` shards are not on disk yet (nanorl.data.fineweb: parallel,
    resumable, checked; base URL $NANORL_FINEWEB_URL), with a progress bar on `console` (a rich Console) when
    given; return the shards that were missing. Nothing is fetched, or even asked, when all are there."""
    from nanorl.data.fineweb import download_fineweb, fineweb_dir, refuse_offline, shard_name, shards_url

    missing = [i for i in range(shards) if not (fineweb_dir() / shard_name(i)).is_file()]
    if not missing:
        return []
    refuse_offline(shards_url(), len(missing), fineweb_dir())  # offline: an error, not a "downloading" line first
    if console is None:
        return [p for p in download_fineweb(shards) if int(p.stem.rsplit("_", 1)[1]) in missing]
    console.print(
        f"[dim]fineweb: downloading {len(missing)} of the first {shards} shards (data.fineweb_shards) into"
        f" {fineweb_dir()}[/]",
        highlight=False,
    )
    paths = download_with_progress(shards, console)
    return [p for p in paths if int(p.stem.rsplit("_", 1)[1]) in missing]


def open_run_corpus(cfg: RunConfig, task: Task | None, split: str = "train", console=None):
    """The corpus `cfg.data.corpus` names; for `fineweb`, the first `data.fineweb_shards` shards are downloaded
    first where missing (`fetch_fineweb`; 0: none, use what `nanorl data download fineweb` fetched). The corpus
    is every shard on disk. In a multi-process run only one process should download (rank 0, then a barrier)."""
    if cfg.data.corpus == "fineweb" and cfg.data.fineweb_shards > 0:
        fetch_fineweb(cfg.data.fineweb_shards, console=console)
    return open_corpus(
        cfg.data.corpus, task=task, skip_bad=cfg.data.skip_bad, split=split, data_dir=cfg.data.data_dir or None
    )


def train_run_tokenizer(
    cfg: RunConfig,
    task: Task | None,
    out: Path | None = None,
    on_chars: Callable[[int], None] | None = None,
    console=None,
):
    """Train the BPE on `cfg.data.corpus` (at most `cfg.tokenizer.train_chars` characters) and save it; FineWeb
    shards the run needs are downloaded first (`open_run_corpus`, with progress on `console`)."""
    from nanorl.tokenizer import train_tokenizer

    corpus = open_run_corpus(cfg, task, console=console)
    tok = train_tokenizer(
        corpus.docs(),
        cfg.model.vocab_size,
        max_digits=cfg.tokenizer.max_digits,
        max_chars=cfg.tokenizer.train_chars,
        on_chars=on_chars,
    )
    tok.meta.update(
        {"corpus": corpus_record(cfg.data.corpus, corpus.name), "skipped_lines": corpus.stats["skipped_lines"]}
    )
    tok.save(out or tokenizer_dir(cfg.name))
    return tok


def held_out_sample(
    corpus_spec: str, task: Task | None, n_docs: int = HELD_OUT_DOCS, data_dir: str | None = None
) -> tuple[list[str], str]:
    """Texts to measure compression on, and what they are: a task's dev split is held out by construction;
    for other corpora, the documents right after the first `n_docs` * 10 (training reads from the start, so on a
    corpus larger than `tokenizer.train_chars` these were not trained on)."""
    if corpus_spec == "task" and task is not None and task_corpus(task, "dev", data_dir) is not None:
        return list(islice(task_corpus(task, "dev", data_dir), n_docs)), f"task:{task.name} dev split"
    docs = open_corpus(corpus_spec, task=task, skip_bad=True, data_dir=data_dir).docs()
    sample = list(islice(docs, n_docs * 10, n_docs * 11))
    if not sample:
        docs = open_corpus(corpus_spec, task=task, skip_bad=True, data_dir=data_dir).docs()
        return list(islice(docs, n_docs)), f"{corpus_spec} (first {n_docs} documents, not held out)"
    return sample, f"{corpus_spec} (documents {n_docs * 10}..{n_docs * 11 - 1})"
