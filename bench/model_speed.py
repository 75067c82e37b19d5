"""CPU fp32 training throughput of the GPT on the BENCHMARKS.md shape (fwd + bwd + AdamW step).

Shape: 4 layers, d_model 256, 2 heads x 128, vocab 8192, seq 256, batch 8, random tokens, fp32, 2 threads.
Model FLOPs per token (BENCHMARKS.md) = 6 * (matmul params) + 12 * layers * d_model * seq.

The machine is shared, so every timed step is paired with a matmul-ceiling probe taken right before it (square
1024 fp32 matmuls, as the shared anchors/matmul_ceiling.sh measures): `pct_of_ceiling` is the median over steps
of (model GFLOP/s) / (probe GFLOP/s), which cancels most of the load from other processes. `tokens_per_s_at_68`
turns that share into tokens/s on the unloaded reference machine (68 GFLOP/s ceiling in BENCHMARKS.md), the
number to hold against nanochat's 1,144-1,222 tok/s (about 60% of the ceiling). `tokens_per_cpu_s` divides by
the process's CPU time per thread instead of wall time (time spent descheduled by other processes drops out).

`--ab` also times the same model written the textbook way (what nanochat's model does on a CPU): its hand-written
autograd functions swapped for the plain PyTorch ops (F.rms_norm, slice-and-cat rotary, relu().square(),
logits -> tanh -> cross_entropy) and three q/k/v matmuls instead of one, alternating step by step with ours.

    .venv/bin/python bench/model_speed.py [--steps 10] [--warmup 3] [--threads 2] [--ab] [--loss-chunks]

Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from _shape import SHAPE, arg_parser, count  # noqa: E402

REFERENCE_CEILING = 68.0  # GFLOP/s, BENCHMARKS.md: fp32 matmul ceiling of the reference machine, 2 threads


def probe_gflops(n: int = 1024, reps: int = 4) -> float:
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=c)
    return 2.0 * n**3 * reps / (time.perf_counter() - t) / 1e9


@contextlib.contextmanager
def plain_autograd():
    """Swap the model's hand-written autograd functions for the textbook ops (for the A/B comparison)."""
    from nanorl.model import gpt

    def plain_rope_norm(x, cos, sin):
        d = x.size(-1) // 2
        x1, x2 = x[..., :d], x[..., d:]
        return F.rms_norm(torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), -1), (x.size(-1),))

    class PlainReLU2:
        apply = staticmethod(lambda x: F.relu(x).square())

    class PlainLoss:
        @staticmethod
        def apply(x, w, targets, cap, row_weights):
            s = torch.tanh((x @ w.t()).float() / cap) * cap
            return F.cross_entropy(s, targets, ignore_index=-1), None

    def plain_attention_forward(self, x, cos, sin, backend, kv_cache=None, return_entropy=False):
        B, T, C = x.shape  # three separate q, k, v matmuls
        q = plain_rope_norm(self.c_q(x).view(B, T, self.n_head, self.head_dim), cos, sin).transpose(1, 2)
        k = plain_rope_norm(self.c_k(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C)), None

    saved = (gpt.norm, gpt.rope_norm, gpt._ReLU2, gpt.FusedLinearSoftcapCE, gpt.CausalSelfAttention.forward)
    gpt.norm = lambda x: F.rms_norm(x, (x.size(-1),))
    gpt.rope_norm, gpt._ReLU2, gpt.FusedLinearSoftcapCE = plain_rope_norm, PlainReLU2, PlainLoss
    gpt.CausalSelfAttention.forward = plain_attention_forward
    try:
        yield
    finally:
        gpt.norm, gpt.rope_norm, gpt._ReLU2, gpt.FusedLinearSoftcapCE, gpt.CausalSelfAttention.forward = saved


def loss_chunks(threads: int, reps: int = 8) -> dict:
    """The fused loss alone (2,048 rows x 256 -> 8,192 logits, fwd+bwd) at several chunk sizes, CPU time."""
    from nanorl.model import gpt

    N, C, V = 2048, 256, 8192
    x = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.05).requires_grad_()
    y = torch.randint(0, V, (N,))
    sizes = {"512K": 2**19, "2M": 2**21, "8M": 2**23, "16M (one chunk)": 2**24}
    default = gpt.LOSS_CHUNK_ELEMENTS["cpu"]
    times = {k: [] for k in sizes}
    try:
        for i in range(reps + 1):
            for name, n in sizes.items():
                gpt.LOSS_CHUNK_ELEMENTS["cpu"] = n
                c = time.process_time()
                gpt.FusedLinearSoftcapCE.apply(x, w, y, 15.0, None)[0].backward()
                if i:  # the first round is warm-up
                    times[name].append((time.process_time() - c) / threads * 1e3)
    finally:
        gpt.LOSS_CHUNK_ELEMENTS["cpu"] = default
    return {k: round(statistics.median(v), 1) for k, v in times.items()}


def main() -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--steps", type=count, default=10, help="timed steps (default 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument("--threads", type=count, default=2)
    ap.add_argument("--ab", action="store_true", help="also time the plain-autograd variant, interleaved")
    ap.add_argument("--loss-chunks", action="store_true", help="only time the fused loss at several chunk sizes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.loss_chunks:
        ms = loss_chunks(args.threads)
        for name, v in ms.items():
            print(f"fused loss fwd+bwd, chunks of {name} logits: {v} ms (CPU time per thread, median)")
        print(json.dumps({"bench": "fused_loss_chunks_cpu", "ms_per_thread": ms}))
        return

    from nanorl.config import resolve
    from nanorl.model import GPT

    # the BENCHMARKS.md shape
    cfg = resolve(overrides=SHAPE).model
    B, T = 8, 256
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    # fused AdamW: the CPU kernel torch ships (nanochat's single-process optimizer is the same fused AdamW)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, fused=True)
    x = torch.randint(0, cfg.vocab_size, (B, T))
    y = torch.randint(0, cfg.vocab_size, (B, T))
    fpt = model.flops_per_token(T)

    def step():
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    variants = {"nanorl": contextlib.nullcontext}
    if args.ab:
        variants["plain_autograd"] = plain_autograd
        # the two variants must compute the same function (same weights: same loss)
        with plain_autograd():
            plain_loss = model(x, y).item()
        assert abs(plain_loss - model(x, y).item()) < 1e-4, "the textbook variant computes something else"
    samples = {k: {"dt": [], "cpu": [], "pct": []} for k in variants}
    for i in range(args.warmup + args.steps):
        for name, ctx in variants.items():
            ceiling = probe_gflops()
            with ctx():
                t, c = time.perf_counter(), time.process_time()
                loss = step()
                dt, dc = time.perf_counter() - t, time.process_time() - c
            if i >= args.warmup:
                samples[name]["dt"].append(dt)
                samples[name]["cpu"].append(dc / args.threads)
                samples[name]["pct"].append(100 * (B * T * fpt / dt / 1e9) / ceiling)

    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    res = {
        "bench": "model_speed_cpu_fp32",
        "shape": "L4 d256 h2x128 V8192 T256 B8",
        "threads": args.threads,
        "flops_per_token": fpt,
        "loss": round(loss.item(), 4),
        "loadavg": load,
        "torch": torch.__version__,
    }
    rows = []
    for name, s in samples.items():
        dt, pct = statistics.median(s["dt"]), statistics.median(s["pct"])
        r = {
            "tokens_per_s": round(B * T / dt, 1),
            "tokens_per_s_best": round(B * T / min(s["dt"]), 1),
            "tokens_per_cpu_s": round(B * T / statistics.median(s["cpu"]), 1),
            "pct_of_ceiling": round(pct, 1),
            "tokens_per_s_at_68": round(pct / 100 * REFERENCE_CEILING * 1e9 / fpt, 1),
        }
        rows.append((name, r))
        res[name] = r
    if args.ab:
        res["speedup_vs_plain"] = round(res["nanorl"]["pct_of_ceiling"] / res["plain_autograd"]["pct_of_ceiling"], 3)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"GPT training, CPU fp32 fwd+bwd+AdamW (load {' '.join(load)})", title_justify="left")
        for col in (
            "variant",
            "tok/s (median)",
            "tok/s (best)",
            "tok/s (CPU time)",
            "% of ceiling",
            "tok/s at 68 GFLOP/s",
        ):
            table.add_column(col, justify="right")
        for name, r in rows:
            table.add_row(
                name,
                *(
                    str(r[k])
                    for k in (
                        "tokens_per_s",
                        "tokens_per_s_best",
                        "tokens_per_cpu_s",
                        "pct_of_ceiling",
                        "tokens_per_s_at_68",
                    )
                ),
            )
        Console().print(table)
    except ImportError:  # pragma: no cover
        pass
    print(json.dumps(res))


if __name__ == "__main__":
    main()
