"""Reading a task's data: the helpers every dataset plugin needs, re-exported by `nanorl.api`.

A task's split comes from a local directory the user names (`data.data_dir`) or from the Hugging Face hub.
The directory holds one file per split, named by one of its stems (`train`, `dev`, `test`, ...), as JSON lines,
a JSON array, or parquet. Rows are read as they are; the task validates them. `TaskExamples` carries what
was skipped; `collect_examples` checks rows and makes the examples, and `warn_bad_rows` reports
the rest. No heavy import happens here at import time: `datasets` and
`pyarrow` load inside the functions that read with them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nanorl.api import Example, NanorlError

# the file suffixes a data directory may use, in the order they are looked for
SUFFIXES = (".json", ".jsonl", ".parquet")
# what a data file may hold, for the hints of the errors that read one
FORMATS = "JSON lines (one object a line), one JSON array, or a .parquet file"
# bad rows named in the warning; the rest are counted
SHOWN_BAD_ROWS = 20
# the variables that keep the Hugging Face libraries off the network, and the values they read as true
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TRUE_VALUES = ("1", "ON", "YES", "TRUE")


class BadRowsWarning(UserWarning):
    """Rows of a data source that failed the task's validation and were skipped."""


class TaskExamples(list):
    """The valid examples of a split (a list), with where they came from and which rows were skipped."""

    def __init__(self, examples: list[Example], source: str, bad_rows: list[tuple[int, str]], total: int):
        super().__init__(examples)
        self.source = source
        self.bad_rows = bad_rows  # (line or row number, reason)
        self.total_rows = total


def find_data_file(data_dir: str | os.PathLike, stems: tuple[str, ...], what: str, hint: str) -> Path:
    """The first `<stem><suffix>` file in `data_dir`, or a NanorlError naming every file looked for."""
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        why = "is a file, not a folder" if directory.exists() else "does not exist"
        raise NanorlError(f"{what} data directory {directory} {why}", hint=hint)
    candidates = [directory / f"{stem}{suffix}" for stem in stems for suffix in SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    names = ", ".join(p.name for p in candidates)
    raise NanorlError(f"no {what} file for this split in {directory} (looked for {names})", hint=hint)


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line or row number, parsed object or the parse error's message) for each row of a file: JSON lines,
    a JSON array, or parquet. A line that is not JSON becomes its error message, for the task to report."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise NanorlError(f"reading {path} needs pyarrow", hint="pip install pyarrow") from e
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise NanorlError(f"cannot read {path} as parquet: {e}") from e
        return list(enumerate(table.to_pylist(), start=1))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:  # a compressed download, a UTF-16 export
        raise NanorlError(f"cannot read {path}: {e}", hint=f"a data file is UTF-8 text: {FORMATS}") from e
    if text.lstrip().startswith("["):  # a JSON array rather than JSON lines
        try:
            return list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise NanorlError(f"{path} is not valid JSON: {e}") from e
    rows: list[tuple[int, Any]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            rows.append((lineno, f"not valid JSON ({e.msg})"))
    return rows


def hf_offline() -> str | None:
    """`NAME=value` of the first of HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set to a true value (1, on, yes or true,
    as the Hugging Face libraries read them), or None when neither is: our own downloads from the hub (FineWeb
    shards) refuse to start then, as `datasets` and `huggingface_hub` do."""
    for name in OFFLINE_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().upper() in TRUE_VALUES:
            return f"{name}={value}"
    return None


def hub_rows(name: str, config: str | None, split: str, hint: str) -> list[tuple[int, Any]]:
    """(row number, row) of a Hugging Face dataset split, cached under $NANORL_HOME/datasets; offline without
    a cached copy, or with the hub unreachable, a NanorlError that says so and how to give the data instead."""
    try:
        import datasets
    except ImportError as e:
        raise NanorlError(f"loading {name} from the hub needs the `datasets` package", hint=hint) from e
    from nanorl.config import nanorl_home

    try:
        ds = datasets.load_dataset(name, config, split=split, cache_dir=str(nanorl_home() / "datasets"))
    except Exception as e:  # offline, no cache, hub down: all the user can do is the same
        offline = hf_offline()
        why = f"offline and not cached ({offline})" if offline else f"{type(e).__name__}: {e}"
        raise NanorlError(f"cannot load {name} ({split}) from the Hugging Face hub: {why}", hint=hint) from e
    return list(enumerate(ds.to_list(), start=1))


def collect_examples(
    rows: list[tuple[int, Any]],
    check: Callable[[Any], str | None],
    make: Callable[[int, Any], Example],
    source: str,
    what: str,
    hint: str,
) -> TaskExamples:
    """The examples of the rows that pass `check` (None: valid; else the reason), made by `make(line, row)`; the
    others are skipped and reported (`warn_bad_rows`)."""
    examples, bad = [], []
    for lineno, row in rows:
        reason = check(row)
        if reason:
            bad.append((lineno, reason))
        else:
            examples.append(make(lineno, row))
    warn_bad_rows(source, bad, len(rows), what, hint)
    return TaskExamples(examples, source, bad, len(rows))


def warn_bad_rows(source: str, bad: list[tuple[int, str]], total: int, what: str, hint: str) -> None:
    """Raise when no row of `source` was valid; warn (BadRowsWarning) naming the first skipped rows otherwise."""
    if len(bad) == total:
        detail = f"; first problem: line {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise NanorlError(f"{source} holds no valid {what} row ({total} rows{detail})", hint=hint)
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:SHOWN_BAD_ROWS])
        more = f"; and {len(bad) - SHOWN_BAD_ROWS} more" if len(bad) > SHOWN_BAD_ROWS else ""
        warnings.warn(f"{source}: skipped {len(bad)} of {total} rows ({shown}{more})", BadRowsWarning, stacklevel=4)
