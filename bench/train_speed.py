"""Training throughput of the real training step on the BENCHMARKS.md shape (batch 8 x 256, fp32):
forward + backward + gradient clipping + the Muon/AdamW step (`nanorl.optim.Optimizers`), as the stages run it.
(bench/model_speed.py, the model engineer's, measures the model with plain AdamW; this adds Muon and clipping.)

    .venv/bin/python bench/train_speed.py [--steps 8] [--warmup 2] [--threads 2]

Prints a table, then one JSON object as the last line. The goal (>= 1.2x nanochat) is measured with plain AdamW
on both sides: bench/model_speed.py beside bench/nanochat_anchor.py. Here --nanochat-tok-s (default: the
anchor's AdamW figure of 2026-11-24, 2,581 tok/s) only puts the stages' heavier Muon step next to it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import arg_parser, count, load_note, model_and_cfg, print_table  # noqa: E402


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--steps", type=count, default=8, help="timed steps (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--threads", type=count, default=2)
    ap.add_argument("--nanochat-tok-s", type=float, default=2581.0, help="nanochat's AdamW step, measured beside")
    args = ap.parse_args()
    import torch

    from nanorl.optim import Optimizers

    model, cfg = model_and_cfg(args.threads)
    opt = Optimizers(model, cfg.optim)
    B, T = 8, 256
    x = torch.randint(0, 8192, (B, T))
    y = torch.randint(0, 8192, (B, T))
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        model(x, y).backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    tok_s = B * T / statistics.median(times)
    flops = model.flops_per_token(T) * tok_s / 1e9
    ratio = tok_s / args.nanochat_tok_s
    rows = [("tokens/s (fwd+bwd+clip+Muon/AdamW)", f"{tok_s:,.0f}"), ("model GFLOP/s", f"{flops:.1f}"),
            (f"vs nanochat's AdamW step ({args.nanochat_tok_s:,.0f})", f"{ratio:.2f}x")]  # fmt: skip
    print_table(f"training step, BENCHMARKS shape, {args.threads} threads ({load_note()})", ("measure", "value"), rows)
    result = {"bench": "train_speed", "tok_s": round(tok_s, 1), "gflops": round(flops, 2)}
    result.update(vs_nanochat_adamw=round(ratio, 2), threads=args.threads, load=load_note())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
