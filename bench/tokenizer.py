"""Tokenizer speed: BPE training MB/s (rustbpe) and encoding tokens/s (tiktoken, one by one and batched).

Corpora: the `arith` task's pretraining corpus (generated, always there) and, when ../shared/data exists, the
GSM8K train split as English-with-numbers text. For reference, the same training with Hugging Face
`tokenizers` (its byte-level BPE trainer, a different pre-tokenizer) on the same text, when it is installed
(no dependency of nanorl's: without it that column reads null).
Usage: python bench/tokenizer.py [--vocab 2048] [--reps 3]
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import arg_parser, count  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def corpora() -> dict[str, list[str]]:
    from nanorl.builtin.arith import ArithTask

    out = {"arith": list(ArithTask(1).corpus())}
    gsm = SHARED / "gsm8k" / "train.jsonl"
    if gsm.is_file():
        rows = [json.loads(line) for line in gsm.read_text().splitlines() if line.strip()]
        out["gsm8k"] = [r["question"] + "\n" + r["answer"] for r in rows]
    return out


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def hf_train(texts: list[str], vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False)
    tk.train_from_iterator(texts, trainer)


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--vocab", type=count, default=2048, help="vocabulary size (default 2048)")
    ap.add_argument("--reps", type=count, default=3, help="timed runs of each, median (default 3)")
    args = ap.parse_args()
    has_hf = importlib.util.find_spec("tokenizers") is not None
    if not has_hf:
        print("Hugging Face `tokenizers` is not installed: its reference column reads null")

    from nanorl.tokenizer import train_tokenizer

    results = {}
    for name, texts in corpora().items():
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        train_tokenizer(texts[:100], 300)  # warm-up (imports, thread pool)
        t_train = median_time(lambda texts=texts: train_tokenizer(texts, args.vocab), args.reps)
        tok = train_tokenizer(texts, args.vocab)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
        t_one = median_time(lambda texts=texts, tok=tok: [tok.encode(t) for t in texts], args.reps)
        t_batch = median_time(lambda texts=texts, tok=tok: tok.encode_batch(texts), args.reps)
        t_hf = median_time(lambda texts=texts: hf_train(texts, args.vocab), 1) if has_hf else None
        results[name] = {
            "mb": round(mb, 2),
            "docs": len(texts),
            "vocab": tok.vocab_size,
            "bytes_per_token": round(mb * 1e6 / n_tokens, 3),
            "train_mb_s": round(mb / t_train, 2),
            "hf_tokenizers_train_mb_s": t_hf and round(mb / t_hf, 2),
            "encode_tok_s": round(n_tokens / t_one),
            "encode_batch_tok_s": round(n_tokens / t_batch),
            "threads": tok.threads,
        }

    cols = ["mb", "vocab", "bytes_per_token", "train_mb_s", "hf_tokenizers_train_mb_s", "encode_tok_s"]
    cols.append("encode_batch_tok_s")
    print(f"{'corpus':<8}" + "".join(f"{c:>26}" for c in cols))
    for name, r in results.items():
        print(f"{name:<8}" + "".join(f"{'-' if r[c] is None else f'{r[c]:,}':>26}" for c in cols))
    print(json.dumps({"bench": "tokenizer", "requested_vocab": args.vocab, "reps": args.reps, "results": results}))


if __name__ == "__main__":
    main()
