"""The training-memory estimate behind a GPU's batch size (`nanorl.model.counts.train_memory`), against what a
real training step uses.

On CUDA: for each depth, the stages' step (bf16 autocast, the fused loss, Muon + AdamW, clipping) on the rows a
pass that `rows_that_fit` picks for this GPU (or --rows), three steps, and the peak of
`torch.cuda.max_memory_allocated` against the estimate's total. The estimate plans for 85% of the GPU; a
measured peak above the estimate eats into that 15% of headroom, above the GPU is an out-of-memory error.

On the CPU (no peak counter): the activations alone, the distinct tensors autograd saves for the backward pass
that grow with the rows (what the estimate's per-token constants were measured from), small depths at --seq-len.

    .venv/bin/python bench/train_memory.py [--depths 8,12,20] [--rows N] [--seq-len 2048] [--steps 3]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _shape import arg_parser, count, print_table  # noqa: E402

GIB = 2**30


def cuda_peak(depth: int, rows: int | None, seq_len: int, steps: int) -> dict:
    """The peak bytes of `steps` real training steps of a depth-`depth` model on this GPU, and the estimate."""
    import torch

    from nanorl.config import resolve
    from nanorl.model import GPT
    from nanorl.model.counts import rows_that_fit, train_memory
    from nanorl.optim import Optimizers

    cfg = resolve(overrides=[f"model.depth={depth}", f"model.seq_len={seq_len}"])
    gpu = torch.cuda.get_device_properties(0).total_memory
    rows = rows or rows_that_fit(cfg.model, gpu)
    est = train_memory(cfg.model, rows)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = GPT(cfg.model)
    model.init_weights()
    opt = Optimizers(model, cfg.optim)
    x = torch.randint(0, cfg.model.vocab_size, (rows, seq_len), device="cuda")
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, x)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, x, loss
    torch.cuda.empty_cache()
    return {"depth": depth, "rows": rows, "estimate_gib": est["total"] / GIB, "peak_gib": peak / GIB,
            "gpu_gib": gpu / GIB, "peak_over_estimate": peak / est["total"]}  # fmt: skip


def cpu_activations(depth: int, rows: int, seq_len: int) -> dict:
    """Bytes autograd saves for the backward of a width-256 model's forward under bf16 autocast, `rows` rows,
    against the estimate's activations. What grows with the rows: saved(2·rows) - saved(rows), so the parameters'
    bf16 copies and everything else of fixed size cancel."""
    import torch

    from nanorl.config import resolve
    from nanorl.model import GPT
    from nanorl.model.counts import saved_bytes, train_memory

    cfg = resolve(overrides=[f"model.depth={depth}", "model.n_embd=256", "model.n_head=2", f"model.seq_len={seq_len}",
                             "model.vocab_size=4096", "model.attention=sdpa"])  # fmt: skip
    model = GPT(cfg.model)
    model.init_weights()

    def saved(n: int) -> int:
        return saved_bytes(model, torch.randint(0, 4096, (n, seq_len)))

    activations = saved(2 * rows) - saved(rows)
    est = train_memory(cfg.model, rows)["activations"]
    return {"depth": depth, "rows": rows, "estimate_gib": est / GIB, "saved_gib": activations / GIB,
            "saved_over_estimate": activations / est}  # fmt: skip


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--depths", default="", help="comma-separated (default: 8,12,20 on CUDA, 2,4 on the CPU)")
    ap.add_argument("--rows", type=int, default=0, help="rows a pass (0: what rows_that_fit picks; CPU: 2)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens a row (default: 2048 on CUDA, 256 on the CPU)")
    ap.add_argument("--steps", type=count, default=3, help="training steps a depth on CUDA (default 3)")
    args = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    depths = [int(d) for d in (args.depths or ("8,12,20" if cuda else "2,4")).split(",")]
    seq_len = args.seq_len or (2048 if cuda else 256)
    if cuda:
        runs = [cuda_peak(d, args.rows or None, seq_len, args.steps) for d in depths]
        table = [(f"depth {r['depth']}, {r['rows']} rows x {seq_len}",
                  f"estimate {r['estimate_gib']:.1f} GiB, peak {r['peak_gib']:.1f} GiB ({r['peak_over_estimate']:.2f}x)"
                  f" of {r['gpu_gib']:.0f}") for r in runs]  # fmt: skip
        title = f"training memory on {torch.cuda.get_device_name(0)}: estimate vs peak"
    else:
        runs = [cpu_activations(d, args.rows or 2, seq_len) for d in depths]
        table = [(f"depth {r['depth']} (width 256), {r['rows']} rows x {seq_len}",
                  f"estimate {r['estimate_gib'] * 1024:.1f} MiB, saved {r['saved_gib'] * 1024:.1f} MiB"
                  f" ({r['saved_over_estimate']:.2f}x)") for r in runs]  # fmt: skip
        title = "activations on the CPU (bf16 autocast): estimate vs what autograd saves"
    print_table(title, ("run", "memory"), table)
    print(json.dumps({"bench": "train_memory", "device": "cuda" if cuda else "cpu", "seq_len": seq_len, "runs": runs}))


if __name__ == "__main__":
    main()
