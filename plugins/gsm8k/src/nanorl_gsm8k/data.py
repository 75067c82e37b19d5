"""GSM8K data: the Hugging Face dataset `openai/gsm8k` (config `main`), or a local directory.

A local directory holds the OpenAI repository's files (`train.jsonl`, `test.jsonl`: one JSON object per line
with `question` and `answer`), or JSON / parquet files with the same fields named after the split.

Splits: GSM8K has train (7,473) and test (1,319) and no development split. `dev` (also `validation`) is a
fixed 1-in-15 slice of train chosen by a hash of the question (~500 problems), and `train` is the rest, so
tuning on dev never sees test and training never sees dev, whatever the seed.

Every row is validated: a non-empty question, and an answer whose last line is `#### N` with N a number
(commas allowed: `#### 1,000`). Bad rows are skipped, counted and reported (a `BadRowsWarning`); a source
with no valid row is an error.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from nanorl.api import (
    Example,
    NanorlError,
    TaskExamples,
    collect_examples,
    find_data_file,
    hub_rows,
    read_rows,
)

HF_NAME, HF_CONFIG = "openai/gsm8k", "main"
SPLITS = ("train", "dev", "validation", "test")
# 1 in DEV_SHARE train problems is dev: ~498 of 7,473, the size of a dev set that tells 5 points apart
DEV_SHARE = 15
HOW_TO_GET = (
    "set data.data_dir=DIR (`--data-dir DIR` on the command line) to a folder holding train.jsonl / test.jsonl from "
    "https://github.com/openai/grade-school-math (grade_school_math/data), or run once online so that the "
    "Hugging Face copy is cached"
)
# the final answer line of a GSM8K solution: `#### 72`, `#### -3`, `#### 1,000`, `#### 0.5`
ANSWER_LINE = re.compile(r"^####\s*(.+?)\s*$")
NUMBER = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?$|^[-+]?\.\d+$")


def normalize_number(text: str) -> str | None:
    """The canonical form of a number as GSM8K writes one: no commas, no sign `+`, no trailing zeros after a
    decimal point, `-0` as `0` ("1,000" -> "1000", "2.50" -> "2.5", "3.0" -> "3"); None when it is not one."""
    t = text.strip().rstrip(".")
    if not NUMBER.match(t):
        return None
    t = t.replace(",", "").lstrip("+")
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    negative = t.startswith("-")
    digits = t.lstrip("-")
    if digits.startswith("."):
        digits = "0" + digits
    if "." in digits:
        whole, frac = digits.split(".")
        digits = f"{whole.lstrip('0') or '0'}.{frac}"
    else:
        digits = digits.lstrip("0") or "0"
    return f"-{digits}" if negative and digits != "0" else digits


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> TaskExamples:
    """The validated examples of one split, from `data_dir` when given, else from the Hugging Face hub."""
    if split not in SPLITS:
        raise NanorlError(f"gsm8k has no split {split!r}", hint=f"use one of: {', '.join(SPLITS)}", exit_code=2)
    source_split = "test" if split == "test" else "train"
    if data_dir:
        path = find_data_file(data_dir, (source_split,), "GSM8K", HOW_TO_GET)
        rows, source = read_rows(path), str(path)
    else:
        rows = hub_rows(HF_NAME, HF_CONFIG, source_split, HOW_TO_GET)
        source = f"hf:{HF_NAME}/{HF_CONFIG}/{source_split}"
    examples = validate_rows(rows, source_split, source)
    if split == "test":
        return examples
    want_dev = split in ("dev", "validation")
    kept = [ex for ex in examples if is_dev(ex.question) == want_dev]
    return TaskExamples(kept, examples.source, examples.bad_rows, examples.total_rows)


def is_dev(question: str) -> bool:
    """Whether a train problem belongs to the dev slice: a hash of its text, so the slice is the same on every
    machine and for every seed (and a problem that appears twice falls on one side)."""
    digest = hashlib.sha256(question.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % DEV_SHARE == 0


def check_row(row: Any) -> str | None:
    """Why a row is not a valid GSM8K problem, or None when it is."""
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return f"not a JSON object ({type(row).__name__})"
    question, answer = row.get("question"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        return "empty or missing question"
    if not isinstance(answer, str) or not answer.strip():
        return "empty or missing answer"
    m = ANSWER_LINE.match(answer.strip().splitlines()[-1])
    if not m:
        return "the answer's last line is not `#### N`"
    if normalize_number(m.group(1)) is None:
        return f"the final answer {m.group(1)!r} is not a number"
    return None


def validate_rows(rows: list[tuple[int, Any]], split: str, source: str) -> TaskExamples:
    def make(lineno: int, row: dict[str, Any]) -> Example:
        lines = row["answer"].strip().splitlines()
        return Example(
            id=f"gsm8k-{split}-{lineno}",
            question=row["question"].strip(),
            answer=normalize_number(ANSWER_LINE.match(lines[-1]).group(1)),
            rationale="\n".join(lines[:-1]).strip(),  # the worked solution, calculator notes included
            meta={"source": source, "line": lineno},
        )

    return collect_examples(rows, check_row, make, source, "GSM8K", HOW_TO_GET)
