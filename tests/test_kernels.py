"""The Triton flash-attention kernel against float64 references.

Without a GPU the kernel runs in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton (and
nanorl.model.kernels.flash) is imported, shapes stay tiny, and the kernel module then uses one 16×16 block
config, so T = 33 exercises two full blocks plus a ragged one. The `gpu` tests run the same parity checks with
bfloat16 on CUDA at real sizes.
"""

import math
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

from nanorl.model.kernels import flash_attention  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# the tiny-shape tests run wherever the kernel runs: compiled on a GPU, interpreted on the CPU
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def reference(q, k, v, causal):
    """Attention and per-row entropy in float64, the plain way (T×T probabilities)."""
    q, k, v = (x.double() for x in (q, k, v))
    n_rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if causal:
        T = q.size(2)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = s.softmax(-1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    return p @ v, ent


def make(B, H, H_kv, T, D, dtype=torch.float32, device=DEV, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(device=device, dtype=dtype) for h in (H, H_kv, H_kv))
    do = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def check(q, k, v, do, causal, atol):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out, ent = flash_attention(q, k, v, causal=causal, return_entropy=True)
    out.backward(do)
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_ent = reference(qr, kr, vr, causal)
    ref.backward(do.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    assert ent.dtype == torch.float32 and ent.shape == q.shape[:3] and not ent.requires_grad
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=0)
    for name, got, want in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "causal,H,H_kv,T,D",
    [
        (True, 2, 2, 33, 16),  # causal, T = 2 blocks + 1 row
        (False, 2, 2, 33, 32),  # non-causal
        (True, 4, 2, 33, 16),  # GQA: two query heads per kv head (dk/dv summed over the group)
        (True, 2, 1, 20, 24),  # multi-query, head dim not a power of two (padded lanes), T < 2 blocks
        (True, 4, 2, 1, 64),  # one token (a 1-row block, 15 masked rows), the model's head dims 64 and 128
        (False, 4, 1, 17, 128),
    ],
)
def test_matches_float64_reference(causal, H, H_kv, T, D):
    q, k, v, do = make(1, H, H_kv, T, D, seed=T + D + H_kv)
    check(q, k, v, do, causal, atol=2e-5)  # fp32 tolerance (max |error| seen: ~1e-6)


def test_fp16_inputs():
    q, k, v, do = make(1, 2, 2, 33, 16, dtype=torch.float16, seed=1)
    check(q, k, v, do, True, atol=5e-3)  # fp16 has ~3 decimal digits


def test_entropy_of_uniform_attention_is_log_of_row_length():
    # q = 0 makes every visible key equally likely: row i of a causal map has entropy ln(i + 1) exactly
    T = 20
    q = torch.zeros(1, 1, T, 16, device=DEV)
    k, v = torch.randn(1, 1, T, 16, device=DEV), torch.randn(1, 1, T, 16, device=DEV)
    out, ent = flash_attention(q, k, v, causal=True, return_entropy=True)
    n = torch.arange(1, T + 1, dtype=torch.float32, device=DEV)
    torch.testing.assert_close(ent[0, 0], torch.log(n))
    torch.testing.assert_close(out[0, 0], v[0, 0].cumsum(0) / n[:, None])


def test_output_without_entropy_is_the_same():
    q, k, v, _ = make(1, 2, 2, 17, 16, seed=3)
    a = flash_attention(q, k, v)
    b, _ = flash_attention(q, k, v, return_entropy=True)
    assert torch.equal(a, b)


def test_poisoned_output_buffers_are_fully_overwritten(monkeypatch):
    """Every buffer the kernel allocates starts as NaN; a row or lane it forgets to write would show up."""
    q, k, v, do = make(1, 2, 1, 33, 24, seed=4)
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):  # float buffers only (the autotuner's integer scratch on a GPU stays as it is)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, ent = flash_attention(qg, kg, vg, causal=True, return_entropy=True)
    out.backward(do)
    for name, t in (("out", out), ("entropy", ent), ("dq", qg.grad), ("dk", kg.grad), ("dv", vg.grad)):
        assert torch.isfinite(t).all(), f"{name} has unwritten (NaN) elements"


def test_strided_inputs_need_no_copy():
    # the model passes (B, T, H, D).transpose(1, 2) views; the kernel reads them through their strides
    q, k, v, _ = make(1, 2, 2, 17, 16, seed=5)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(flash_attention(qt, kt, vt), flash_attention(q, k, v))


def test_output_is_laid_out_as_the_model_reads_it():
    """out (B, H, T, D) lives in (B, T, H, D) memory, so the model's y.transpose(1, 2).reshape(B, T, C) is a
    view: before, the (B, H, T, D)-contiguous output made it a copy that c_proj kept for its backward. Forward
    and backward against float64 with the gradient coming back through that reshape (dO in the same strided
    layout, as the model's backward hands it over), and with a contiguous dO."""
    B, H, H_kv, T, D = 2, 4, 2, 33, 16
    q, k, v, do = make(B, H, H_kv, T, D, seed=11)
    for grad_layout in ("model", "contiguous"):
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        out, ent = flash_attention(qg, kg, vg, causal=True, return_entropy=True)
        assert out.shape == (B, H, T, D) and out.transpose(1, 2).is_contiguous()
        y = out.transpose(1, 2).reshape(B, T, H * D)
        assert y.data_ptr() == out.data_ptr() and y._base is not None  # a view: nothing copied
        if grad_layout == "model":
            y.backward(do.transpose(1, 2).reshape(B, T, H * D))
        else:
            out.backward(do)
        qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref, ref_ent = reference(qr, kr, vr, True)
        ref.backward(do.double())
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)
        torch.testing.assert_close(ent.double(), ref_ent, atol=2e-5, rtol=0)
        for name, got, want in (("dq", qg.grad, qr.grad), ("dk", kg.grad, kr.grad), ("dv", vg.grad, vr.grad)):
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_model_on_the_triton_backend_keeps_no_more_than_on_sdpa():
    """What autograd keeps for the backward on the triton backend (what a GPU runs) equals what it keeps on sdpa
    (what counts.ACTIVATION_BYTES, the GPU batch-size estimate, was measured on): the kernel's output layout
    used to cost a kept copy of it per layer, 2 more bytes a token and width per layer under autocast. On a GPU
    both run on it, under CUDA's autocast (the triton backend refuses CPU tensors outside the interpreter)."""
    from nanorl.config import resolve
    from nanorl.model import GPT
    from nanorl.model.counts import saved_bytes

    idx = torch.randint(0, 256, (2, 32), device=DEV)
    saved = {}
    for backend in ("triton", "sdpa"):
        cfg = resolve(
            overrides=["model.depth=2", "model.n_embd=64", "model.n_head=2", "model.vocab_size=265"]
            + ["model.seq_len=32", f"model.attention={backend}"]
        ).model
        torch.manual_seed(0)
        model = GPT(cfg).to(DEV)
        model.init_weights()
        saved[backend] = saved_bytes(model, idx, mixed=True)
    assert saved["triton"] <= saved["sdpa"], saved


def test_bad_inputs_are_refused_clearly():
    q = torch.randn(1, 2, 8, 320)
    with pytest.raises(ValueError, match="head dim 320"):
        flash_attention(q, q, q)
    q, k, v, _ = make(1, 3, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        flash_attention(q, k, v)
    with pytest.raises(ValueError, match="Tq != Tk"):
        flash_attention(q[:, :2], k[:, :, :4], v[:, :, :4])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("H,H_kv", [(4, 4), (8, 2)])
def test_gpu_bf16_parity_with_sdpa(D, H, H_kv):
    import torch.nn.functional as F

    T = 1000  # not a multiple of any block size
    q, k, v, do = make(2, H, H_kv, T, D, dtype=torch.bfloat16, device="cuda", seed=D)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out, ent = flash_attention(qg, kg, vg, causal=True, return_entropy=True)
    out.backward(do)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=H_kv != H)
    ref.backward(do)
    # bf16 keeps ~3 significant digits; both sides round differently, so compare at bf16 resolution
    for got, want in ((out, ref), (qg.grad, qr.grad), (kg.grad, kr.grad), (vg.grad, vr.grad)):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    _, ref_ent = reference(q[:, :, :256], k[:, :, :256], v[:, :, :256], True)
    torch.testing.assert_close(ent[:, :, :256].double(), ref_ent, atol=2e-2, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fp32_matches_float64():
    q, k, v, do = make(1, 4, 2, 300, 64, device="cuda", seed=7)
    check(q, k, v, do, True, atol=1e-4)


def test_model_on_the_triton_backend_matches_sdpa():
    """The dispatch end to end: the GPT with model.attention=triton (strided q/k/v views, GQA, entropy)."""
    from nanorl.config import resolve
    from nanorl.model import GPT

    idx = torch.randint(0, 64, (1, 19), device=DEV)
    results = []
    for backend in ("triton", "sdpa"):
        cfg = resolve(
            overrides=[
                "model.depth=1",
                "model.n_embd=32",
                "model.n_head=2",
                "model.n_kv_head=1",
                "model.vocab_size=265",
                "model.seq_len=32",
                f"model.attention={backend}",
            ]
        ).model
        torch.manual_seed(0)
        model = GPT(cfg).to(DEV)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2)
        logits, ent = model(idx, return_entropy=True)
        model(idx, idx).backward()
        results.append((logits, ent, [p.grad for p in model.parameters()]))
    (la, ea, ga), (lb, eb, gb) = results
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ea, eb, atol=1e-5, rtol=1e-5)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# Compiling for an H100 needs no GPU: triton ships ptxas. The interpreter accepts code a real compile rejects
# (it caught a module-level float read inside a kernel), so every kernel is built for sm_90 once, in a fresh
# process without TRITON_INTERPRET (under it, @triton.jit gives interpreter objects that cannot be compiled).
_AOT_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nanorl.model.kernels import flash as F

CONST = ("HEAD_DIM", "D_PAD", "CAUSAL", "RETURN_ENTROPY", "DOT_PREC", "BLOCK_M", "BLOCK_N")
def build(kernel, consts, warps, stages):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    sig = {}
    for n in fn.arg_names:
        if n in CONST:
            sig[n] = "constexpr"
        elif n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[n] = "*bf16"
        elif n in ("LSE", "ENT", "DELTA"):
            sig[n] = "*fp32"
        else:
            sig[n] = "fp32" if n in ("qk_scale", "sm_scale") else "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

d = {"HEAD_DIM": 128, "D_PAD": 128, "CAUSAL": True, "DOT_PREC": "tf32"}
build(F._fwd_kernel, {**d, "RETURN_ENTROPY": True, "BLOCK_M": 128, "BLOCK_N": 64}, 8, 3)
build(F._bwd_delta_kernel, {"HEAD_DIM": 128, "D_PAD": 128, "BLOCK_M": 64}, 4, 1)
build(F._bwd_dkdv_kernel, {**d, "BLOCK_M": 32, "BLOCK_N": 128}, 8, 3)
build(F._bwd_dq_kernel, {**d, "BLOCK_M": 128, "BLOCK_N": 32}, 8, 3)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_h100_without_a_gpu(tmp_path):
    import subprocess
    import sys

    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, not a cache hit
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
