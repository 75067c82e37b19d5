"""Answer extraction on AQuA gold rationales: how often the letter read from a rationale is the gold one.

    .venv/bin/python plugins/aqua/bench/extraction.py [--data-dir ../shared/data/aqua] [--split dev] [-v]

Two readings: letters only (what scores model completions) and with the options (adds the value fallback:
the last number of the last line matched against the options). Prints a table, the misses with -v, and as
its last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from nanorl.api import extract_letter
from nanorl_aqua.data import load_split
from nanorl_aqua.plugin import AquaTask

ROOT = Path(__file__).resolve().parents[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT / ".." / "shared" / "data" / "aqua"))
    parser.add_argument("--split", default="dev")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every miss")
    args = parser.parse_args()
    with warnings.catch_warnings(record=True) as bad:
        warnings.simplefilter("always")
        examples = load_split(args.split, args.data_dir)
    task = AquaTask()
    result: dict = {"split": args.split, "rows": len(examples), "bad_rows": len(examples.bad_rows)}
    print(f"{'reading':<14} {'right':>6} {'wrong':>6} {'none':>6} {'accuracy':>9} {'precision':>10}")
    for name, options in (("letters_only", False), ("with_options", True)):
        right = wrong = none = 0
        for e in examples:
            got = extract_letter(e.rationale or "", options=e.options if options else None)
            if got is None:
                none += 1
            elif got == e.answer:
                right += 1
            else:
                wrong += 1
            if args.verbose and got != e.answer:
                print(f"  line {e.meta['line']}: got {got} gold {e.answer}: {e.rationale[-80:]!r}", file=sys.stderr)
        n = len(examples)
        answered = right + wrong
        row = {
            "right": right,
            "wrong": wrong,
            "none": none,
            "accuracy": right / n,
            "precision": right / answered if answered else 0.0,
        }
        result[name] = row
        print(f"{name:<14} {right:>6} {wrong:>6} {none:>6} {row['accuracy']:>9.4f} {row['precision']:>10.4f}")
    # the SFT targets: each must end with the gold line and state no other letter
    targets_ok = sum(extract_letter(task.target(e)) == e.answer for e in examples)
    result["sft_targets_ok"] = targets_ok
    print(f"SFT targets whose extracted letter is the gold one: {targets_ok} / {len(examples)}")
    if bad:
        print(f"({len(examples.bad_rows)} bad rows skipped)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
