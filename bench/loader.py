"""Packing-loader speed alone: tokens/s of (x, y) batches out of PackedLoader, tokenizing included.

Shapes: the tiny preset's (batch 8 x 256) on the `arith` corpus, and batch 8 x 2048 on GSM8K text (longer
English documents; skipped when ../shared/data is absent). The loader must stay far above what the model
consumes: ~8k tokens/s for a tiny model on this 2-core CPU, ~1M tokens/s per GPU for a d20 model on an H100.
Usage: python bench/loader.py [--batches 400]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import arg_parser, count  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--batches", type=count, default=400, help="timed batches, after the first (default 400)")
    args = ap.parse_args()

    from nanorl.builtin.arith import ArithTask
    from nanorl.data import PackedLoader
    from nanorl.tokenizer import train_tokenizer

    cases = {"arith 8x256": (list(ArithTask(1).corpus()), 8, 256)}
    gsm = SHARED / "gsm8k" / "train.jsonl"
    if gsm.is_file():
        rows = [json.loads(line) for line in gsm.read_text().splitlines() if line.strip()]
        cases["gsm8k 8x2048"] = ([r["question"] + "\n" + r["answer"] for r in rows], 8, 2048)

    results = {}
    for name, (docs, batch, seq) in cases.items():
        tok = train_tokenizer(docs, 2048)
        loader = PackedLoader(docs, tok, batch_size=batch, seq_len=seq, seed=0)
        next(loader)  # warm-up: the first block
        t = time.perf_counter()
        n = 0
        for _ in range(args.batches):
            x, _ = next(loader)
            n += x.numel()
        secs = time.perf_counter() - t
        results[name] = {
            "tokens_s": round(n / secs),
            "batches": args.batches,
            "tokens": n,
            "dropped_frac": round(loader.stats["dropped_tokens"] / max(1, loader.stats["tokens"]), 4),
            "epochs_seen": loader.epoch,
        }
    print(f"{'case':<16}{'tokens/s':>14}{'tokens':>12}{'dropped':>10}")
    for name, r in results.items():
        print(f"{name:<16}{r['tokens_s']:>14,}{r['tokens']:>12,}{r['dropped_frac']:>10.2%}")
    print(json.dumps({"bench": "loader", "results": results}))


if __name__ == "__main__":
    main()
