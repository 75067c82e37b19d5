"""Pretraining text from local files, downloaded FineWeb-EDU shards, or a task's own corpus.

A `Corpus` is a re-iterable, deterministic stream of documents (strings): `corpus.docs()` starts a new pass,
always in the same order, which is what lets the packing loader resume by position.

Local files, by extension:
- `.txt`: documents separated by blank lines (one or more empty lines), streamed line by line;
- `.jsonl`: one JSON object per line with a string `text` field (blank lines are ignored);
- `.parquet`: the `text` column, read one row group at a time.
A directory or a glob means every such file under it / among its matches (other files are left out); a file named
by itself must be one of these types. Files are read in sorted order. A UTF-8 byte-order mark is not text, CRLF
line ends read as LF (`.txt`), and an empty document is skipped (it would be a lone <|bos|>).

Bad input — a corrupt or truncated file, a line that is not UTF-8 / not JSON / has no `text`, a corpus with no
documents — stops with a `NanorlError` naming the file (and line). With `skip_bad=True` a bad line or an
unreadable file is skipped and counted in `corpus.stats` instead; an empty corpus is always an error.
"""

from __future__ import annotations

import glob
import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from nanorl.api import NanorlError, Task

EXTENSIONS = (".txt", ".jsonl", ".parquet")


class Corpus:
    """Documents from `sources` (file paths, or callables returning an iterable of strings), in order."""

    def __init__(self, sources: list[Path | Callable[[], Iterable[str]]], name: str = "", skip_bad: bool = False):
        self.sources = sources
        self.name = name or ", ".join(str(s) for s in sources if isinstance(s, Path))[:200]
        self.skip_bad = skip_bad
        self.stats = {"docs": 0, "skipped_lines": 0, "skipped_files": 0}

    def docs(self) -> Iterator[str]:
        """One pass over every document. Raises NanorlError when the pass finds none."""
        self.stats = {"docs": 0, "skipped_lines": 0, "skipped_files": 0}
        for src in self.sources:
            it = _read_file(src, self) if isinstance(src, Path) else iter(src())
            for doc in it:
                if doc:
                    self.stats["docs"] += 1
                    yield doc
        if self.stats["docs"] == 0:
            skipped = self.stats["skipped_lines"] + self.stats["skipped_files"]
            raise NanorlError(
                f"the corpus {self.name or '(unnamed)'} has no documents"
                + (f" ({skipped} bad lines/files skipped)" if skipped else ""),
                hint="check the corpus path, or its files' contents",
            )

    def __iter__(self) -> Iterator[str]:
        return self.docs()

    def text_bytes(self) -> int | None:
        """The corpus's size in bytes of text, from the files' metadata without reading them: a parquet file's
        uncompressed `text` column less its 4-byte length prefixes, another file's size (JSON's quoting included).
        None when a source is not a file (a task's corpus): only a whole pass would tell."""
        total = 0
        for src in self.sources:
            if not isinstance(src, Path):
                return None
            if src.suffix.lower() != ".parquet":
                total += src.stat().st_size
                continue
            import pyarrow.parquet as pq

            meta = pq.read_metadata(src)
            col = meta.schema.names.index("text") if "text" in meta.schema.names else None
            for rg in range(meta.num_row_groups if col is not None else 0):
                group = meta.row_group(rg)
                total += max(0, group.column(col).total_uncompressed_size - 4 * group.num_rows)
        return total

    def bad(self, what: str, kind: str) -> None:
        """A bad line or file: an error, or (skip_bad) one more in the count."""
        if not self.skip_bad:
            raise NanorlError(what, hint="fix or remove it, or pass data.skip_bad=true to skip bad lines and files")
        self.stats[kind] += 1


def _read_file(path: Path, corpus: Corpus) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from _read_txt(path, corpus)
    elif suffix == ".jsonl":
        yield from _read_jsonl(path, corpus)
    elif suffix == ".parquet":
        yield from _read_parquet(path, corpus)
    else:
        raise NanorlError(f"{path}: unsupported file type (use {', '.join(EXTENSIONS)})", exit_code=2)


def _lines(path: Path, corpus: Corpus) -> Iterator[tuple[int, str]]:
    """(line number, text) of a file's lines, decoded as UTF-8 one by one so a bad line names itself."""
    try:
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: drops a byte-order mark
                except UnicodeDecodeError:
                    corpus.bad(f"{path}:{n}: the line is not valid UTF-8", "skipped_lines")
                    continue
                yield n, line
    except OSError as e:
        corpus.bad(f"{path}: cannot read it: {e.strerror or e}", "skipped_files")


def _read_txt(path: Path, corpus: Corpus) -> Iterator[str]:
    doc: list[str] = []
    for _, line in _lines(path, corpus):
        if line.strip():
            doc.append(line.rstrip("\r\n"))
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def _read_jsonl(path: Path, corpus: Corpus) -> Iterator[str]:
    for n, line in _lines(path, corpus):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            corpus.bad(f"{path}:{n}: not valid JSON ({e.msg})", "skipped_lines")
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            corpus.bad(f"{path}:{n}: no string field 'text'", "skipped_lines")
            continue
        yield text


def _read_parquet(path: Path, corpus: Corpus) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            corpus.bad(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})", "skipped_files")
            return
    except (OSError, pa.ArrowException) as e:
        corpus.bad(f"{path}: not a readable parquet file ({e})", "skipped_files")
        return
    for rg in range(pf.num_row_groups):
        try:
            texts = pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()
        except (OSError, pa.ArrowException) as e:
            corpus.bad(f"{path}: row group {rg} is unreadable ({e})", "skipped_files")
            return
        for t in texts:
            if isinstance(t, str):
                yield t


def expand_paths(spec: str) -> list[Path]:
    """Files named by a path, a directory (recursive) or a glob; comma-separated specs are concatenated. A
    directory or a glob gives its corpus files only; a file named by itself of another type is an error here, at
    once, not when a pass reaches it."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        p = Path(part).expanduser()
        if p.is_file() and p.suffix.lower() not in EXTENSIONS:
            raise NanorlError(f"{p}: unsupported file type (use {', '.join(EXTENSIONS)})", exit_code=2)
        if p.is_dir():
            matches = [f for f in p.rglob("*") if f.is_file()]
        elif p.is_file():
            matches = [p]
        else:
            matches = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
        found = sorted(f for f in matches if f.suffix.lower() in EXTENSIONS)
        if not found:
            n = len(matches)
            others = f" ({n} file{'s' if n != 1 else ''} matched, none {', '.join(EXTENSIONS)})" if n else ""
            raise NanorlError(
                f"no corpus files at {part!r}{others}",
                hint=f"give a file, a directory or a glob of {', '.join(EXTENSIONS)} files",
                exit_code=2,
            )
        files += found
    return files


def task_corpus(task: Task, split: str, data_dir: str | None = None):
    """`task.corpus(split, data_dir=...)`, or `task.corpus(split)` for a task whose method does not take
    `data_dir` (written before nanorl passed it: it keeps working)."""
    try:
        params = inspect.signature(task.corpus).parameters
    except (TypeError, ValueError):  # a builtin or C callable: call it the documented old way
        params = {}
    takes = "data_dir" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return task.corpus(split, data_dir=data_dir) if takes else task.corpus(split)


def open_corpus(
    spec: str, task: Task | None = None, skip_bad: bool = False, split: str = "train", data_dir: str | None = None
) -> Corpus:
    """The corpus that `data.corpus` names: "task" (the task's own text; `data_dir`: `data.data_dir`, the task's
    files), "fineweb" (downloaded shards), or paths."""
    if spec == "task":
        if task is None:
            raise NanorlError("corpus 'task' needs a task", exit_code=2)
        if task_corpus(task, split, data_dir) is None:
            raise NanorlError(
                f"task {task.name!r} has no pretraining corpus of its own",
                hint="use data.corpus=fineweb (after `nanorl data download fineweb`) or a path; the task's"
                f" author can give {type(task).__name__} a corpus(split) method that returns its text"
                " (nanorl.api.Task.corpus, docs/plugins.md)",
                exit_code=2,
            )
        return Corpus([lambda: task_corpus(task, split, data_dir)], name=f"task:{task.name}", skip_bad=skip_bad)
    if spec == "fineweb":
        from nanorl.data.fineweb import fineweb_shards

        shards = fineweb_shards()
        if not shards:
            raise NanorlError(
                "no FineWeb-EDU shards downloaded",
                hint="run `nanorl data download fineweb --shards 24` (one pass of depth 8's budget), or set"
                " data.fineweb_shards=N for a run to download the first N itself",
            )
        return Corpus(list(shards), name="fineweb", skip_bad=skip_bad)
    return Corpus(list(expand_paths(spec)), name=spec, skip_bad=skip_bad)


def describe(corpus: Corpus) -> dict[str, Any]:
    return {"name": corpus.name, "sources": len(corpus.sources), **corpus.stats}
