"""AQuA-RAT data: the Hugging Face dataset `deepmind/aqua_rat` (config `raw`), or a local directory.

A local directory holds the DeepMind repository's files (`train.json`, `dev.json`, `test.json`: one JSON
object per line), or JSONL / parquet files with the same fields (`question`, `options`, `rationale`,
`correct`) named after the split. `dev` and `validation` name the same split.

Every row is validated: a non-empty question, five options labelled A) .. E) in that order, `correct` one of
A..E. Bad rows are skipped, counted and reported (a `BadRowsWarning` naming their line numbers, and the
`bad_rows` of the returned list); a source with no valid row is an error.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from nanorl.api import LETTERS, Example, NanorlError, option_label

HF_NAME, HF_CONFIG = "deepmind/aqua_rat", "raw"
# split name -> (Hugging Face split, file stems to look for in a data directory)
SPLITS = {
    "train": ("train", ("train",)),
    "dev": ("validation", ("dev", "validation", "valid", "val")),
    "validation": ("validation", ("dev", "validation", "valid", "val")),
    "test": ("test", ("test",)),
}
SUFFIXES = (".json", ".jsonl", ".parquet")
HOW_TO_GET = (
    "set data.data_dir=DIR (`--data-dir DIR` on `nanorl data`) to a folder holding train.json / dev.json / "
    "test.json from https://github.com/google-deepmind/AQuA, or run once online so that the Hugging Face copy "
    "is cached"
)
_SHOWN = 20  # bad rows named in the warning; the rest are counted


class BadRowsWarning(UserWarning):
    """Rows of an AQuA source that failed validation and were skipped."""


class AquaExamples(list):
    """The valid examples of a split (a list), with where they came from and which rows were skipped."""

    def __init__(self, examples: list[Example], source: str, bad_rows: list[tuple[int, str]], total: int):
        super().__init__(examples)
        self.source = source
        self.bad_rows = bad_rows  # (line or row number, reason)
        self.total_rows = total


def nanorl_home() -> Path:
    # the same rule as nanorl.config.run_dir's home, which a plugin may not import: $NANORL_HOME or the cache
    return Path(os.environ.get("NANORL_HOME") or "~/.cache/nanorl").expanduser()


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> AquaExamples:
    """The validated examples of one split, from `data_dir` when given, else from the Hugging Face hub."""
    if split not in SPLITS:
        raise NanorlError(f"aqua has no split {split!r}", hint=f"use one of: {', '.join(SPLITS)}", exit_code=2)
    hf_split, stems = SPLITS[split]
    if data_dir:
        path = find_file(Path(data_dir).expanduser(), stems)
        return validate_rows(read_rows(path), split, str(path))
    return validate_rows(hub_rows(hf_split), split, f"hf:{HF_NAME}/{HF_CONFIG}/{hf_split}")


def find_file(data_dir: Path, stems: tuple[str, ...]) -> Path:
    if not data_dir.is_dir():
        raise NanorlError(f"AQuA data directory {data_dir} does not exist", hint=HOW_TO_GET)
    candidates = [data_dir / f"{stem}{suffix}" for stem in stems for suffix in SUFFIXES]
    for path in candidates:
        if path.is_file():
            return path
    names = ", ".join(p.name for p in candidates)
    raise NanorlError(f"no AQuA file for this split in {data_dir} (looked for {names})", hint=HOW_TO_GET)


def read_rows(path: Path) -> list[tuple[int, Any]]:
    """(line or row number, parsed object or the parse error's message) for each row of a file."""
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
    except (OSError, UnicodeDecodeError) as e:
        raise NanorlError(f"cannot read {path}: {e}") from e
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


def hub_rows(hf_split: str) -> list[tuple[int, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise NanorlError("loading AQuA-RAT from the hub needs the `datasets` package", hint=HOW_TO_GET) from e
    cache = nanorl_home() / "datasets"
    try:
        ds = datasets.load_dataset(HF_NAME, HF_CONFIG, split=hf_split, cache_dir=str(cache))
    except Exception as e:  # offline, no cache, hub down: all the user can do is the same
        offline = any(os.environ.get(v) == "1" for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
        why = "offline and not cached" if offline else f"{type(e).__name__}: {e}"
        message = f"cannot load {HF_NAME} ({hf_split}) from the Hugging Face hub: {why}"
        raise NanorlError(message, hint=HOW_TO_GET) from e
    return list(enumerate(ds.to_list(), start=1))


def check_row(row: Any) -> str | None:
    """Why a row is not a valid AQuA problem, or None when it is."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    question, options, correct = row.get("question"), row.get("options"), row.get("correct")
    if not isinstance(question, str) or not question.strip():
        return "empty or missing question"
    if not isinstance(options, list) or len(options) != len(LETTERS):
        n = len(options) if isinstance(options, list) else "no"
        return f"{n} options (expected 5)"
    for letter, opt in zip(LETTERS, options, strict=True):
        if not isinstance(opt, str) or option_label(opt) != letter:
            return f"option {letter} is {opt!r} (expected a label {letter})"
    if correct not in LETTERS:
        return f"correct is {correct!r} (expected one of A-E)"
    rationale = row.get("rationale")
    if rationale is not None and not isinstance(rationale, str):
        return "rationale is not text"
    return None


def validate_rows(rows: list[tuple[int, Any]], split: str, source: str) -> AquaExamples:
    examples, bad = [], []
    for lineno, row in rows:
        reason = check_row(row)
        if reason:
            bad.append((lineno, reason))
            continue
        examples.append(
            Example(
                id=f"aqua-{split}-{lineno}",
                question=row["question"].strip(),
                answer=row["correct"],
                options=list(row["options"]),
                rationale=row.get("rationale") or "",
                meta={"source": source, "line": lineno},
            )
        )
    if not examples:
        detail = f"; first problem: line {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise NanorlError(f"{source} holds no valid AQuA row ({len(rows)} rows{detail})", hint=HOW_TO_GET)
    if bad:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:_SHOWN])
        more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        warnings.warn(f"{source}: skipped {len(bad)} of {len(rows)} rows ({shown}{more})", BadRowsWarning, stacklevel=3)
    return AquaExamples(examples, source, bad, len(rows))
