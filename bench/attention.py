"""The Triton flash-attention kernel against PyTorch SDPA (flash backend): time and TFLOP/s.

On a CUDA GPU: bf16, causal, B·H fixed at 16·16 / T, T = 1k, 2k, 4k, 8k, D = 64 and 128: forward, forward +
backward, and the forward with return_entropy=True (its cost over the plain forward). Goal (BENCHMARKS.md, H100,
T=4096, D=128): forward >= 1.0x SDPA, forward+backward >= 0.9x, entropy <= 5% extra.
FLOPs counted as in the FlashAttention papers: forward 4·B·H·T²·D, halved for causal; backward 2.5x forward.

Without a GPU it only runs the correctness check (Triton interpreter, tiny shapes) and says so.

    .venv/bin/python bench/attention.py [--reps 20]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _shape import arg_parser, count  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported


def time_ms(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps, CUDA events, after warm-up (which also runs the autotuner)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tflops(flop: float, ms: float) -> float:
    return flop / ms / 1e9


def gpu_case(D: int, T: int, reps: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from nanorl.model.kernels import flash_attention

    B, H = max(1, 16384 // T), 16  # the same number of tokens per call at every T
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)
    do = torch.randn_like(q)
    fwd_flop = 4 * B * H * T * T * D / 2  # causal: half the score matrix

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours():
        return flash_attention(q, k, v, causal=True)

    def ours_entropy():
        return flash_attention(q, k, v, causal=True, return_entropy=True)

    with torch.no_grad():
        t_sdpa_f, t_ours_f, t_ent_f = (time_ms(f, reps) for f in (sdpa, ours, ours_entropy))
    t_sdpa_fb = time_ms(lambda: torch.autograd.backward(sdpa(), do), reps)
    t_ours_fb = time_ms(lambda: torch.autograd.backward(ours(), do), reps)
    return {
        "D": D,
        "T": T,
        "B": B,
        "H": H,
        "fwd_ms": round(t_ours_f, 3),
        "sdpa_fwd_ms": round(t_sdpa_f, 3),
        "fwd_tflops": round(tflops(fwd_flop, t_ours_f), 1),
        "sdpa_fwd_tflops": round(tflops(fwd_flop, t_sdpa_f), 1),
        "fwd_speedup": round(t_sdpa_f / t_ours_f, 3),
        "fwdbwd_ms": round(t_ours_fb, 3),
        "sdpa_fwdbwd_ms": round(t_sdpa_fb, 3),
        "fwdbwd_tflops": round(tflops(3.5 * fwd_flop, t_ours_fb), 1),
        "sdpa_fwdbwd_tflops": round(tflops(3.5 * fwd_flop, t_sdpa_fb), 1),
        "fwdbwd_speedup": round(t_sdpa_fb / t_ours_fb, 3),
        "entropy_overhead_pct": round(100 * (t_ent_f / t_ours_f - 1), 1),
    }


def cpu_check() -> dict:
    """Forward, gradients and entropy against float64 on tiny shapes, in the interpreter."""
    from nanorl.model.kernels import flash_attention

    torch.manual_seed(0)
    B, H, H_kv, T, D = 1, 4, 2, 33, 16
    q, k, v = (torch.randn(B, h, T, D, requires_grad=True) for h in (H, H_kv, H_kv))
    out, ent = flash_attention(q, k, v, causal=True, return_entropy=True)
    do = torch.randn_like(out)
    out.backward(do)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    kk, vv = kd.repeat_interleave(H // H_kv, 1), vd.repeat_interleave(H // H_kv, 1)
    s = (qd @ kk.transpose(-1, -2) / math.sqrt(D)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    p = s.softmax(-1)
    ref = p @ vv
    ref.backward(do.double())
    ref_ent = -(p * p.clamp_min(1e-300).log()).sum(-1)
    err = {
        "out": (out.double() - ref).abs().max().item(),
        "entropy": (ent.double() - ref_ent).abs().max().item(),
        "dq": (q.grad.double() - qd.grad).abs().max().item(),
        "dk": (k.grad.double() - kd.grad).abs().max().item(),
        "dv": (v.grad.double() - vd.grad).abs().max().item(),
    }
    return {"shape": [B, H, H_kv, T, D], "max_abs_err": err, "ok": all(e < 2e-5 for e in err.values())}


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--reps", type=count, default=20, help="timed calls a case on CUDA (default 20)")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not HAS_CUDA:
        res = cpu_check()
        console.print("[yellow]no CUDA device: correctness check only (Triton interpreter, tiny shapes); no timings[/]")
        table = Table(
            title=f"flash_attention vs float64, shape (B, H, H_kv, T, D) = {tuple(res['shape'])}", title_justify="left"
        )
        table.add_column("quantity")
        table.add_column("max |error|", justify="right")
        for k, e in res["max_abs_err"].items():
            table.add_row(k, f"{e:.2e}")
        console.print(table)
        print(json.dumps({"bench": "attention", "device": "cpu", "mode": "correctness_only", **res}))
        sys.exit(0 if res["ok"] else 1)  # a kernel off its float64 reference fails `make bench`

    rows = [gpu_case(D, T, args.reps) for D in (64, 128) for T in (1024, 2048, 4096, 8192)]
    table = Table(title=f"causal bf16 attention on {torch.cuda.get_device_name()}", title_justify="left")
    cols = (
        "D",
        "T",
        "fwd_tflops",
        "sdpa_fwd_tflops",
        "fwd_speedup",
        "fwdbwd_tflops",
        "sdpa_fwdbwd_tflops",
        "fwdbwd_speedup",
        "entropy_overhead_pct",
    )
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*(str(r[c]) for c in cols))
    console.print(table)
    key = next((r for r in rows if r["T"] == 4096 and r["D"] == 128), None)
    print(
        json.dumps({"bench": "attention", "device": torch.cuda.get_device_name(), "rows": rows, "goal_T4096_D128": key})
    )


if __name__ == "__main__":
    main()
