"""AQuA-RAT data: the Hugging Face dataset `deepmind/aqua_rat` (config `raw`), or a local directory.

A local directory holds the DeepMind repository's files (`train.json`, `dev.json`, `test.json`: one JSON
object per line), or JSONL / parquet files with the same fields (`question`, `options`, `rationale`,
`correct`) named after the split. `dev` and `validation` name the same split, and its examples are `aqua-dev-N`
either way (as the built-in `arith` task's are), so that evaluations asked for either pair up by id.

Every row is validated: a non-empty question, five non-empty options labelled A) .. E) in that order, `correct`
one of A..E, and no other option reading as the correct one (two right letters). Bad rows are skipped, counted
and reported (a `BadRowsWarning` naming their line numbers, and the `bad_rows` of the returned list); a source
with no valid row is an error.
"""

from __future__ import annotations

import os
from typing import Any

from nanorl.api import (
    LETTERS,
    BadRowsWarning,
    Example,
    NanorlError,
    TaskExamples,
    collect_examples,
    find_data_file,
    hub_rows,
    option_label,
    option_text,
    read_rows,
)

__all__ = ["BadRowsWarning", "load_split", "check_row", "validate_rows"]

HF_NAME, HF_CONFIG = "deepmind/aqua_rat", "raw"
# split name -> (Hugging Face split, file stems to look for in a data directory)
SPLITS = {
    "train": ("train", ("train",)),
    "dev": ("validation", ("dev", "validation", "valid", "val")),
    "validation": ("validation", ("dev", "validation", "valid", "val")),
    "test": ("test", ("test",)),
}
HOW_TO_GET = (
    "set data.data_dir=DIR (`--data-dir DIR` on the command line) to a folder holding train.json / dev.json / "
    "test.json from https://github.com/google-deepmind/AQuA, or run once online so that the Hugging Face copy "
    "is cached"
)


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> TaskExamples:
    """The validated examples of one split, from `data_dir` when given, else from the Hugging Face hub."""
    if split not in SPLITS:
        raise NanorlError(f"aqua has no split {split!r}", hint=f"use one of: {', '.join(SPLITS)}", exit_code=2)
    hf_split, stems = SPLITS[split]
    split = "dev" if split == "validation" else split  # one name in the ids (`--compare` pairs by id)
    if data_dir:
        path = find_data_file(data_dir, stems, "AQuA", HOW_TO_GET)
        return validate_rows(read_rows(path), split, str(path))
    return validate_rows(
        hub_rows(HF_NAME, HF_CONFIG, hf_split, HOW_TO_GET), split, f"hf:{HF_NAME}/{HF_CONFIG}/{hf_split}"
    )


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
        if not option_text(opt):
            return f"option {letter} is empty"
    if correct not in LETTERS:
        return f"correct is {correct!r} (expected one of A-E)"
    # two options that read alike are harmless unless one is the answer: then the other is right too, and a
    # model choosing it would be scored wrong (dev line 93 repeats a wrong option, which is kept)
    texts = [" ".join(option_text(opt).lower().split()) for opt in options]
    gold = LETTERS.index(correct)
    for letter, text in zip(LETTERS, texts, strict=True):
        if text == texts[gold] and letter != correct:
            return f"option {letter} reads as the correct option {correct} ({option_text(options[gold])!r})"
    rationale = row.get("rationale")
    if rationale is not None and not isinstance(rationale, str):
        return "rationale is not text"
    return None


def validate_rows(rows: list[tuple[int, Any]], split: str, source: str) -> TaskExamples:
    def make(lineno: int, row: dict[str, Any]) -> Example:
        return Example(
            id=f"aqua-{split}-{lineno}",
            question=row["question"].strip(),
            answer=row["correct"],
            options=list(row["options"]),
            rationale=row.get("rationale") or "",
            meta={"source": source, "line": lineno},
        )

    return collect_examples(rows, check_row, make, source, "AQuA", HOW_TO_GET)
