"""Engine generation speed on the BENCHMARKS.md shape: 1 prompt x 64 tokens -> 16 samples x 128 new, T=1.

KV cache (prefill once, shared by 16 rows, one token per step) vs no cache (the full sequence re-run for
every new token), both over the goal's 128 new tokens: the no-cache cost grows with the length, so timing it over
fewer tokens would flatter it. tokens/s counts sampled tokens.

    .venv/bin/python bench/generate.py [--reps 3] [--threads 2] [--nocache-tokens 128]

Prints a table, then one JSON object as the last line. Goal (issue 5): >= 2x nanochat's Engine and >= 10x the
no-cache path. Pass --nanochat-tok-s from bench/nanochat_anchor.py run beside (default: the mean of its two
2026-11-24 fifth-session runs, 1,455 tok/s; BENCHMARKS.md's 670-790 came from a machine about 2x slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import StubTokenizer, load_note, model_and_cfg, print_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nocache-tokens", type=int, default=128)
    ap.add_argument("--nanochat-tok-s", type=float, default=1455.0, help="nanochat's Engine, measured beside")
    args = ap.parse_args()
    import torch

    from nanorl.engine import Engine

    model, _ = model_and_cfg(args.threads)
    engine = Engine(model, StubTokenizer())
    prompt = torch.randint(0, 8192, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    G, N = 16, 128

    def timed(n_new: int, cache: bool) -> float:
        t = time.perf_counter()
        out = engine.sample([prompt], num_samples=G, max_new_tokens=n_new, temperature=1.0, seed=1, use_cache=cache)
        dt = time.perf_counter() - t
        assert all(len(s.tokens) == n_new for s in out[0])
        return G * n_new / dt

    timed(8, True)  # warm-up
    cached = statistics.median(timed(N, True) for _ in range(args.reps))
    nocache = timed(args.nocache_tokens, False)
    rows = [
        ("KV cache (16 x 128 new)", f"{cached:,.0f}"),
        (f"no cache (16 x {args.nocache_tokens} new)", f"{nocache:,.0f}"),
        ("speed-up", f"{cached / nocache:.1f}x"),
        (f"vs nanochat's Engine ({args.nanochat_tok_s:,.0f} tok/s)", f"{cached / args.nanochat_tok_s:.2f}x"),
    ]
    print_table(f"generation, BENCHMARKS shape, {args.threads} threads ({load_note()})", ("path", "tok/s"), rows)
    print(json.dumps({"bench": "generate", "cached_tok_s": round(cached, 1), "nocache_tok_s": round(nocache, 1),
                      "speedup": round(cached / nocache, 1), "vs_nanochat": round(cached / args.nanochat_tok_s, 2),
                      "threads": args.threads, "load": load_note()}))  # fmt: skip


if __name__ == "__main__":
    main()
