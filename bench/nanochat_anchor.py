"""A nanochat anchor: nanochat's own GPT (training step) and Engine (KV-cache generation) on the BENCHMARKS.md
shape, to run right before or after our bench/model_speed.py, bench/train_speed.py and bench/generate.py.

nanochat's source is not part of this repository: point --src (or NANOCHAT_SRC) at a folder holding its
`nanochat/` package (gpt.py, engine.py, common.py, muon.py, adamw.py, __init__.py; engine.py also imports
nanochat.checkpoint_manager at module level, which may be a stub: only its __main__ uses it). The figures in
docs/benchmarks.md used karpathy/nanochat gpt.py, engine.py, common.py @6383d5db, muon.py @23c51711,
adamw.py @449494c8; a SOURCES.txt in --src (lines `<path> <repo>@<commit>`) is echoed into the JSON.
nanochat's files are run unedited; every CPU accommodation is made here and listed in the JSON's "notes".

    OMP_NUM_THREADS=2 .venv/bin/python bench/nanochat_anchor.py --src DIR [--threads 2] [--opt adamw|muon|both]

Prints a table, then one JSON object as the last line.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--src", default=os.environ.get("NANOCHAT_SRC", ""), help="folder holding nanochat's package")
ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
ap.add_argument("--steps", type=int, default=10, help="timed training steps per optimizer variant")
ap.add_argument("--warmup", type=int, default=3, help="warm-up training steps per optimizer variant")
ap.add_argument("--reps", type=int, default=5, help="timed generation repetitions (after 1 warm-up)")
ap.add_argument("--only", choices=["train", "generate", "all"], default="all")
ap.add_argument(
    "--opt",
    choices=["adamw", "muon", "both"],
    default="both",
    help="training optimizer variant(s): adamw = one torch AdamW over all params; "
    "muon = nanochat's setup_optimizers() (AdamW + nanochat Muon)",
)
ap.add_argument(
    "--no-compile",
    action="store_true",
    help="set TORCHDYNAMO_DISABLE=1 (nanochat's Muon decorates its Newton-Schulz with "
    "@torch.compile; this runs it eagerly instead). Off by default.",
)
args = ap.parse_args()

if args.no_compile:
    os.environ["TORCHDYNAMO_DISABLE"] = "1"  # must be set before torch is imported

if not os.path.isfile(os.path.join(args.src, "nanochat", "gpt.py")):
    sys.exit(f"no nanochat/gpt.py under --src {args.src!r}: pass the folder that holds nanochat's package")
HERE = os.path.abspath(args.src)
sys.path.insert(0, HERE)

import torch  # noqa: E402

torch.set_num_threads(args.threads)

from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

# fixed model shape (do not change: it is what the peer project is compared on)
CFG = dict(sequence_len=256, vocab_size=8192, n_layer=4, n_head=2, n_kv_head=2, n_embd=256)
TRAIN_B, TRAIN_T = 8, 256
GEN_PROMPT_LEN, GEN_SAMPLES, GEN_MAX_TOKENS = 64, 16, 128
SEED = 1337

notes = []


def note(msg):
    if msg not in notes:
        notes.append(msg)


def read_sources():
    """SOURCES.txt lines: '<path> <repo>@<commit> ...' -> {path: 'repo@commit'}"""
    out = {}
    path = os.path.join(HERE, "SOURCES.txt")
    lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []  # noqa: SIM115
    if lines:
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) >= 2:
                out[parts[0]] = parts[1]
    return out


def build_model():
    """nanochat GPT on CPU, init_weights(), then everything float32 where nanochat allows it."""
    torch.manual_seed(SEED)
    model = GPT(GPTConfig(**CFG))
    model.init_weights()
    before = {n: str(p.dtype).replace("torch.", "") for n, p in model.named_parameters() if p.dtype != torch.float32}
    wte_dtype = str(model.transformer.wte.weight.dtype).replace("torch.", "")
    rot_dtype = str(model.cos.dtype).replace("torch.", "")
    # (1) make all parameters (incl. the token embedding, which nanochat casts to bf16 on GPUs) fp32
    model.float()  # NB: this also casts the cos/sin buffers to fp32 ...
    # (2) ... but this gpt.py's forward() asserts `self.cos.dtype == torch.bfloat16`, so the
    # rotary tables must stay bf16 for forward() to run at all. Re-set them to nanochat's own bf16
    # tables (x is fp32, so the rotary products are computed in fp32 by type promotion).
    model.cos, model.sin = model.cos.bfloat16(), model.sin.bfloat16()
    note(
        f"dtypes after nanochat init_weights() on CPU: wte={wte_dtype} (this gpt.py casts wte to bf16 only "
        f"when on CUDA), non-fp32 params={before or 'none'}, rotary cos/sin={rot_dtype}"
    )
    note(
        "harness: model.float() -> all params fp32; rotary cos/sin buffers then re-set to bf16 because this "
        "nanochat GPT.forward asserts bf16 rotary buffers (fp32 cos/sin would fail the assert); activations, "
        "weights, grads and KV cache are fp32, only the (T x head_dim/2) cos/sin tables are bf16"
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def make_adamw(model):
    kw = dict(lr=1e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    try:
        opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
        fused = True
    except Exception as e:  # pragma: no cover - depends on torch build
        opt = torch.optim.AdamW(model.parameters(), fused=False, **kw)
        fused = False
        note(f"--opt adamw: fused=True unsupported on CPU ({type(e).__name__}: {e}); using fused=False")
    note(f"--opt adamw: single torch.optim.AdamW over all params, fused={fused}, lr=1e-3, betas=(0.8,0.95)")
    return [opt]


def make_nanochat_opts(model):
    # nanochat's own recipe: AdamW(fused=True) for lm_head+wte, nanochat Muon for the block matrices.
    opts = model.setup_optimizers()
    kinds = [type(o).__name__ for o in opts]
    fused = opts[0].defaults.get("fused")
    note(
        f"--opt muon: nanochat setup_optimizers() -> {kinds} (AdamW fused={fused} as hard-coded by nanochat; "
        f"Muon Newton-Schulz in bf16 under @torch.compile"
        f"{' [DISABLED via --no-compile]' if args.no_compile else ''})"
    )
    return opts


def bf16_penalty():
    """Tiny diagnostic (~0.1 s): nanochat's Muon runs Newton-Schulz in bf16; report how this CPU does bf16 GEMM."""
    a32 = torch.randn(256, 1024)
    b32 = torch.randn(1024, 256)
    res = {}
    for name, a, b in (("fp32", a32, b32), ("bf16", a32.bfloat16(), b32.bfloat16())):
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        res[name] = (time.perf_counter() - t0) / 3
    note(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}: 256x1024x256 matmul fp32 "
        f"{res['fp32'] * 1e3:.2f} ms vs bf16 {res['bf16'] * 1e3:.2f} ms ({res['bf16'] / res['fp32']:.1f}x); nanochat's "
        f"Muon does its Newton-Schulz in bf16 (X = G.bfloat16()), so on CPUs without native bf16 the muon "
        f"variant is dominated by optimizer.step (see median_opt_s)"
    )


def train_bench(opt_kind):
    model = build_model()
    model.train()
    opts = make_adamw(model) if opt_kind == "adamw" else make_nanochat_opts(model)
    g = torch.Generator().manual_seed(SEED)
    n = args.warmup + args.steps
    batches = [
        (
            torch.randint(0, CFG["vocab_size"], (TRAIN_B, TRAIN_T), generator=g),
            torch.randint(0, CFG["vocab_size"], (TRAIN_B, TRAIN_T), generator=g),
        )
        for _ in range(max(n, 1))
    ]
    losses, times, opt_times = [], [], []
    for i in range(n):
        x, y = batches[i]
        t0 = time.perf_counter()
        loss = model(x, targets=y, loss_reduction="mean")
        loss.backward()
        t1 = time.perf_counter()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        lv = loss.item()
        t2 = time.perf_counter()
        losses.append(lv)
        times.append(t2 - t0)
        opt_times.append(t2 - t1)
    assert all(math.isfinite(v) for v in losses), f"non-finite loss: {losses}"
    timed = times[args.warmup :]
    med = statistics.median(timed) if timed else float("nan")
    return dict(
        opt=opt_kind,
        loss0=losses[0],
        loss_last=losses[-1],
        warmup_s=times[: args.warmup],
        timed_s=timed,
        median_step_s=med,
        median_opt_s=statistics.median(opt_times[args.warmup :]) if timed else float("nan"),
        tok_s=(TRAIN_B * TRAIN_T / med) if timed else float("nan"),
    )


class StubTokenizer:
    """
    Minimal stand-in for nanochat's tokenizer, providing exactly what Engine.generate uses:
    encode_special() for 5 special tokens and get_bos_token_id() (plus encode/decode, which the
    Engine only calls inside a <|python_start|>...<|python_end|> tool block). All special ids are
    >= vocab_size, and this GPT's logits have exactly vocab_size columns, so none of them can ever
    be sampled: no row ends early and the calculator tool path never triggers.
    """

    def __init__(self, vocab_size):
        from nanorl.tokenizer import SPECIAL_TOKENS  # nanochat's nine special tokens: ours use the same names

        self.special = {s: vocab_size + i for i, s in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, s):
        return self.special[s]

    def get_bos_token_id(self):
        return self.special["<|bos|>"]

    def encode(self, *a, **k):
        raise RuntimeError("StubTokenizer.encode called: tool-use path should be unreachable")

    def decode(self, *a, **k):
        raise RuntimeError("StubTokenizer.decode called: tool-use path should be unreachable")


def generate_bench():
    model = build_model()
    model.eval()
    tok = StubTokenizer(CFG["vocab_size"])
    engine = Engine(model, tok)
    g = torch.Generator().manual_seed(SEED + 1)
    prompt = torch.randint(0, CFG["vocab_size"], (GEN_PROMPT_LEN,), generator=g).tolist()
    specials = set(tok.special.values())

    def one_run():
        rows = [[] for _ in range(GEN_SAMPLES)]
        n_forced = 0
        t0 = time.perf_counter()
        for token_column, token_masks in engine.generate(
            prompt, num_samples=GEN_SAMPLES, max_tokens=GEN_MAX_TOKENS, temperature=1.0, top_k=None, seed=42
        ):
            for i, t in enumerate(token_column):
                rows[i].append(t)
            n_forced += token_masks.count(0)
        dt = time.perf_counter() - t0
        assert len(rows) == GEN_SAMPLES and all(len(r) == GEN_MAX_TOKENS for r in rows), (
            f"rows/lengths: {len(rows)} x {[len(r) for r in rows]}"
        )
        assert n_forced == 0 and not any(t in specials for r in rows for t in r)
        assert all(0 <= t < CFG["vocab_size"] for r in rows for t in r)
        return dt, rows

    warm_dt, rows = one_run()
    times = [one_run()[0] for _ in range(args.reps)]
    med = statistics.median(times) if times else float("nan")
    note(
        "generate: nanochat Engine.generate(prompt of 64 random ids, num_samples=16, max_tokens=128, "
        "temperature=1.0, top_k=None, seed=42) with its KVCache; timed = 1 batch-1 prefill (T=64) + 127 batch-16 "
        "decode forwards (Engine broadcasts the prefill-sampled token as every row's 1st token); "
        "tok/s = 16*128/wall time"
    )
    note(
        "generate: stub tokenizer special ids are >= vocab_size (never sampled), so all 16 rows run the full "
        "128 tokens (checked every rep)"
    )
    return dict(
        rows=len(rows),
        row_lens=sorted(set(len(r) for r in rows)),
        distinct_first_tokens=len(set(r[0] for r in rows)),
        distinct_rows=len(set(tuple(r) for r in rows)),
        warmup_s=warm_dt,
        timed_s=times,
        median_s=med,
        tok_s=(GEN_SAMPLES * GEN_MAX_TOKENS / med) if times else float("nan"),
    )


def main():
    sources = read_sources()
    nparams = sum(p.numel() for p in GPT(GPTConfig(**CFG)).parameters())
    print(
        f"nanochat CPU anchor | torch {torch.__version__} | threads={torch.get_num_threads()} "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}) | model {CFG} | params={nparams:,}"
    )
    print(f"sources: {sources}")
    res = {}
    if args.only in ("train", "all"):
        kinds = ("adamw", "muon") if args.opt == "both" else (args.opt,)
        if "muon" in kinds:
            bf16_penalty()
        for kind in kinds:
            r = train_bench(kind)
            res[kind] = r
            print(
                f"[train --opt {kind}] step0 loss={r['loss0']:.4f} (ln(V)={math.log(CFG['vocab_size']):.4f}) "
                f"last loss={r['loss_last']:.4f} | warmup step s={[round(t, 3) for t in r['warmup_s']]} "
                f"| timed step s={[round(t, 3) for t in r['timed_s']]} (median optimizer.step part "
                f"{r['median_opt_s']:.3f} s)"
            )
    if args.only in ("generate", "all"):
        r = generate_bench()
        res["gen"] = r
        print(
            f"[generate] rows={r['rows']} row_lens={r['row_lens']} distinct_first_tokens={r['distinct_first_tokens']} "
            f"distinct_rows={r['distinct_rows']} | warmup s={r['warmup_s']:.3f} "
            f"| timed s={[round(t, 3) for t in r['timed_s']]}"
        )

    def fmt(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.1f}"

    print()
    print(f"{'benchmark':<34}{'median':>14}{'tokens/s':>14}")
    for kind in ("adamw", "muon"):
        if kind in res:
            label, step_s = "train B=8 T=256 --opt " + kind, res[kind]["median_step_s"]
            print(f"{label:<34}{step_s:>12.4f} s{fmt(res[kind]['tok_s']):>14}")
    if "gen" in res:
        print(f"{'generate 16x128 (+64 prompt)':<34}{res['gen']['median_s']:>12.4f} s{fmt(res['gen']['tok_s']):>14}")
    print()
    out = {
        "bench": "nanochat_anchor",
        "sources": sources,
        "threads": torch.get_num_threads(),
        "train_tok_s_adamw": res["adamw"]["tok_s"] if "adamw" in res else None,
        "train_tok_s_muon": res["muon"]["tok_s"] if "muon" in res else None,
        "generate_tok_s": res["gen"]["tok_s"] if "gen" in res else None,
        "train_opt_step_s_adamw": res["adamw"]["median_opt_s"] if "adamw" in res else None,
        "train_opt_step_s_muon": res["muon"]["median_opt_s"] if "muon" in res else None,
        "train_loss0_adamw": res["adamw"]["loss0"] if "adamw" in res else None,
        "train_loss0_muon": res["muon"]["loss0"] if "muon" in res else None,
        "steps": args.steps,
        "warmup": args.warmup,
        "reps": args.reps,
        "notes": notes,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
