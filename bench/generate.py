"""Engine generation speed on the BENCHMARKS.md shape: 1 prompt x 64 tokens -> 16 samples x 128 new, T=1.

KV cache (prefill once, shared by 16 rows, one token per step) vs no cache (the full sequence re-run for
every new token), both over the goal's 128 new tokens: the no-cache cost grows with the length, so timing it over
fewer tokens would flatter it. tokens/s counts sampled tokens. The cached path runs twice: eager, and with the
decode step compiled (`Engine(compile=True)`, config `engine.compile`); the compiled figure comes after a
warm-up whose time (the compile, once per process) is reported beside it.

    .venv/bin/python bench/generate.py [--reps 3] [--threads 2] [--nocache-tokens 128] [--nanochat-src DIR]
                                       [--no-compile]

Prints a table, then one JSON object as the last line. Goal (issue 5): >= 2x nanochat's Engine and >= 10x the
no-cache path. With --nanochat-src (or NANOCHAT_SRC) the nanochat anchor (bench/nanochat_anchor.py) runs
right before and right after ours, in its own process, and the ratio is to the mean of its two runs; without,
to --nanochat-tok-s (default: the mean of the anchor's two 2026-11-24 fifth-session runs, 1,455 tok/s;
BENCHMARKS.md's 670-790 came from a machine about 2x slower).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import StubTokenizer, arg_parser, count, load_note, model_and_cfg, print_table  # noqa: E402


def nanochat_tok_s(src: str, threads: int) -> float:
    """One run of the nanochat anchor's generation benchmark, in a fresh process (its last line is JSON)."""
    cmd = [sys.executable, str(Path(__file__).parent / "nanochat_anchor.py"), "--src", src, "--only", "generate",
           "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"the nanochat anchor failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["generate_tok_s"])


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--reps", type=count, default=3, help="timed generations of each cached path (default 3)")
    ap.add_argument("--threads", type=count, default=2)
    ap.add_argument("--nocache-tokens", type=count, default=128, help="new tokens of the no-cache run (default 128)")
    ap.add_argument("--nanochat-tok-s", type=float, default=1455.0, help="nanochat's Engine, measured beside")
    ap.add_argument("--nanochat-src", default=os.environ.get("NANOCHAT_SRC", ""),
                    help="a folder holding nanochat's package: run its anchor before and after ours")  # fmt: skip
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    args = ap.parse_args()
    anchor = [nanochat_tok_s(args.nanochat_src, args.threads)] if args.nanochat_src else []
    import torch

    from nanorl.engine import Engine

    model, _ = model_and_cfg(args.threads)
    prompt = torch.randint(0, 8192, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    G, N = 16, 128

    def timed(engine: Engine, n_new: int, cache: bool) -> float:
        t = time.perf_counter()
        out = engine.sample([prompt], num_samples=G, max_new_tokens=n_new, temperature=1.0, seed=1, use_cache=cache)
        dt = time.perf_counter() - t
        assert all(len(s.tokens) == n_new for s in out[0])
        return G * n_new / dt

    eager = Engine(model, StubTokenizer())
    timed(eager, 8, True)  # warm-up
    cached = statistics.median(timed(eager, N, True) for _ in range(args.reps))
    nocache = timed(eager, args.nocache_tokens, False)
    compiled = compile_s = None
    if not args.no_compile:
        engine = Engine(model, StubTokenizer(), compile=True)
        t = time.perf_counter()
        timed(engine, 8, True)  # compiles the step
        compile_s = time.perf_counter() - t
        if engine.decoder.failed:
            sys.exit(f"compiled decoding failed: {engine.decoder.failed}")
        compiled = statistics.median(timed(engine, N, True) for _ in range(args.reps))
    if anchor:
        anchor.append(nanochat_tok_s(args.nanochat_src, args.threads))
        args.nanochat_tok_s = statistics.mean(anchor)
    source = f"side by side: {', '.join(f'{a:,.0f}' for a in anchor)}" if anchor else "given"
    rows = [
        ("KV cache, eager (16 x 128 new)", f"{cached:,.0f}"),
        (f"no cache (16 x {args.nocache_tokens} new)", f"{nocache:,.0f}"),
        ("speed-up of the eager cache", f"{cached / nocache:.1f}x"),
        (f"eager vs nanochat's Engine ({args.nanochat_tok_s:,.0f} tok/s, {source})",
         f"{cached / args.nanochat_tok_s:.2f}x"),
    ]  # fmt: skip
    if compiled:
        rows += [
            (f"KV cache, compiled decode step (after a {compile_s:.1f} s warm-up)", f"{compiled:,.0f}"),
            ("compiled vs nanochat's Engine", f"{compiled / args.nanochat_tok_s:.2f}x"),
        ]
    print_table(f"generation, BENCHMARKS shape, {args.threads} threads ({load_note()})", ("path", "tok/s"), rows)
    print(json.dumps({"bench": "generate", "cached_tok_s": round(cached, 1), "nocache_tok_s": round(nocache, 1),
                      "speedup": round(cached / nocache, 1), "vs_nanochat": round(cached / args.nanochat_tok_s, 2),
                      "compiled_tok_s": compiled and round(compiled, 1), "compile_s": compile_s and round(compile_s, 1),
                      "compiled_vs_nanochat": compiled and round(compiled / args.nanochat_tok_s, 2),
                      "nanochat_tok_s": round(args.nanochat_tok_s, 1), "nanochat_runs": [round(a, 1) for a in anchor],
                      "threads": args.threads, "load": load_note()}))  # fmt: skip


if __name__ == "__main__":
    main()
