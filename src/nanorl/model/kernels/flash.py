"""Flash attention in Triton: forward, backward, grouped-query attention, and attention entropy for free.

Layout: q (B, H, T, D), k and v (B, H_kv, T, D), H a multiple of H_kv (query head h reads kv head h // (H/H_kv)).
Any strides are accepted as long as the last dim is contiguous, so the model's (B, T, H, D).transpose(1, 2)
views go in without a copy.

Forward (one program per BLOCK_M query rows of one (batch, head)): stream the key/value blocks, keep the
online-softmax statistics in base 2 (u = s·log2(e) with s = q·k/√D):
    m = max_j u_j,   l = Σ_j 2^(u_j - m),   acc = Σ_j 2^(u_j - m) v_j
rescaling by α = 2^(m_old - m_new) whenever the running max grows; out = acc / l. The kernel stores
lse2 = m + log2(l) per row for the backward pass (the T×T matrix never exists).

Entropy of row i, H = -Σ_j p_j ln p_j with p_j = e^{s_j} / Σ e^{s}:
    ln p_j = s_j - lse,  so  H = lse - Σ_j p_j s_j.
In base 2 with the running max: lse = ln2·(m + log2 l) and s_j = ln2·u_j, so
    H = ln2·( log2(l) - w / l ),   w = Σ_j 2^(u_j - m)·(u_j - m).
w is kept relative to the running max (every term ≤ 0, no cancellation against a large m). When the max moves
from m_old to m_new each old term's weight scales by α and its (u_j - m) gains (m_old - m_new), so
    w_new = α·(w_old + l_old·(m_old - m_new)) + Σ_{j in block} 2^(u_j - m_new)·(u_j - m_new).
That is one multiply-add per score on top of the softmax: the `RETURN_ENTROPY` constexpr compiles it out when
not asked for. The entropy is telemetry: it is returned detached (no gradient flows through it).

Backward (FlashAttention-2, recompute-based): delta_i = Σ_d dO_id·O_id (a small kernel), then
    P = 2^(q·k·scale·log2e - lse2),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - delta),  dQ = dS K·scale,
    dK = dSᵀ Q·scale
in two kernels: one program per key block of one kv head accumulates dK, dV over the query blocks of every
query head in its group (so GQA needs no atomics and no per-head scratch), and one program per query block
computes dQ. Both recompute P from q, k and lse2. Every output element is written exactly once (plain stores,
no accumulation into the output), so the outputs may start as torch.empty and autotuning may re-run a kernel.

Causal masking is top-left = bottom-right (the kernel takes Tq == Tk; decode steps go through sdpa). Blocks
strictly below the diagonal run without the mask; only the diagonal blocks (and the ragged last block when T
is not a multiple of the block) pay for it.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# In the interpreter (CPU tests) autotune must see exactly one config, and tiny blocks keep it fast.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634  # log2(e): exp(x) = 2^(x·log2 e)
MAX_HEAD_DIM = 256  # the largest head dim whose q/k/v tiles still fit in shared memory (with small blocks)


def _configs(pairs):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) -> triton.Config list; a single tiny config under the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]


# H100 candidates (228 KB shared memory per SM, 4 warpgroups): the forward wants a tall query tile (128 rows,
# 8 warps) and a 64-row key tile pipelined 3-4 deep; the smaller ones are for head dims 192-256 whose tiles
# would not fit. BLOCK_M must be a multiple of BLOCK_N (the diagonal then covers whole key blocks).
_FWD_CONFIGS = _configs(
    [
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 32, 4, 2),
    ]
)
# dK/dV: a tall key tile (the accumulators) and thin query tiles streamed past it; BLOCK_N % BLOCK_M == 0.
_DKDV_CONFIGS = _configs([(32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (32, 32, 4, 2)])
# dQ: like the forward, a tall query tile and thin key tiles; BLOCK_M % BLOCK_N == 0.
_DQ_CONFIGS = _configs([(128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2), (32, 32, 4, 2)])


# fmt: off
# (kernel signatures and launches keep several arguments a line: one a line would triple this file)

# ---------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_block(
    acc, l_i, m_i, w_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n, offs_d, T, qk_scale,
    HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, RETURN_ENTROPY: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    cols = start_n + offs_n
    kv_mask = offs_d[None, :] < HEAD_DIM
    if MASK:
        kv_mask = kv_mask & (cols[:, None] < T)
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    u = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # scores in log2 units
    if MASK:
        allowed = cols[None, :] < T
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= offs_m[:, None])
        u = tl.where(allowed, u, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(u, 1))
    alpha = tl.math.exp2(m_i - m_new)
    um = u - m_new[:, None]
    p = tl.math.exp2(um)
    if RETURN_ENTROPY:
        if MASK:
            pu = p * tl.where(p > 0.0, um, 0.0)  # masked scores have p = 0 and um = -inf: 0, not nan
        else:
            pu = p * um
        w_i = alpha * (w_i + l_i * (m_i - m_new)) + tl.sum(pu, 1)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new, w_i


@triton.autotune(configs=_FWD_CONFIGS, key=["T_BUCKET", "HEAD_DIM", "CAUSAL", "RETURN_ENTROPY"])
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, ENT, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb,
    stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, H, T,
    T_BUCKET,  # autotune key: T rounded up to a power of two (a new T does not re-tune)
    N_REP, qk_scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // N_REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    # the running max starts finite (not -inf) so that l·(m_old - m_new) is 0·finite = 0 on the first block
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    w_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    if CAUSAL:
        full_hi = pid_m * BLOCK_M  # key blocks entirely left of the diagonal: no mask
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N  # every whole key block; the ragged tail is masked
        hi = T
    for start_n in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i, w_i = _fwd_block(
            acc, l_i, m_i, w_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n, offs_d, T,
            qk_scale, HEAD_DIM, False, CAUSAL, RETURN_ENTROPY, DOT_PREC,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i, w_i = _fwd_block(
            acc, l_i, m_i, w_i, q, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n, offs_d, T,
            qk_scale, HEAD_DIM, True, CAUSAL, RETURN_ENTROPY, DOT_PREC,
        )

    # rows past T have l = 0 (nothing stored for them); keep them finite anyway
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
        out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
    )
    log2_l = tl.math.log2(l_safe)
    tl.store(LSE + bh * T + offs_m, m_i + log2_l, mask=row_ok)
    if RETURN_ENTROPY:
        # H = ln2·(log2 l - w/l); ln 2 written out: a kernel may not read a module-level float, and a
        # tl.constexpr global breaks the interpreter
        tl.store(ENT + bh * T + offs_m, 0.6931471805599453 * (log2_l - w_i / l_safe), mask=row_ok)


# ---------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot, H, T,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = Σ_d O_id·dO_id, float32, (B·H, T)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_block(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, start_m, offs_m0, offs_n,
    offs_d, T, qk_scale, HEAD_DIM: tl.constexpr, MASK: tl.constexpr, DOT_PREC: tl.constexpr,
):
    offs_m = start_m + offs_m0
    row_ok = offs_m < T
    ld_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=ld_mask, other=0.0)
    # rows past T: lse = +inf makes their P exactly 0, so they add nothing
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    uT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
    pT = tl.math.exp2(uT - lse[None, :])
    if MASK:  # the diagonal: query m sees key n only when n <= m
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=["T_BUCKET", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt, H, H_KV, T,
    T_BUCKET,  # autotune key: T rounded up to a power of two (a new T does not re-tune)
    N_REP, qk_scale, sm_scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bkh = tl.program_id(1)
    b = bkh // H_KV
    kvh = bkh % H_KV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(
        K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    v = tl.load(
        V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0
    )
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    for r in range(N_REP):  # every query head that reads this kv head
        h = kvh * N_REP + r
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * T
        delta_base = DELTA + (b * H + h) * T
        if CAUSAL:
            # queries on this key block's diagonal need the mask; the ones below it see every key here
            diag_hi = tl.minimum(start_n + BLOCK_N, T)
            for start_m in range(start_n, diag_hi, BLOCK_M):
                dk, dv = _dkdv_block(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, start_m,
                    offs_m0, offs_n, offs_d, T, qk_scale, HEAD_DIM, True, DOT_PREC,
                )
            lo = start_n + BLOCK_N
        else:
            lo = 0
        for start_m in range(lo, T, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, start_m, offs_m0,
                offs_n, offs_d, T, qk_scale, HEAD_DIM, False, DOT_PREC,
            )
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=kv_mask,
    )
    tl.store(
        DV + b * stride_dvb + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=kv_mask,
    )


@triton.jit
def _dq_block(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n, offs_d, T, qk_scale,
    HEAD_DIM: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
):
    cols = start_n + offs_n
    kv_mask = offs_d[None, :] < HEAD_DIM
    if MASK:
        kv_mask = kv_mask & (cols[:, None] < T)
    k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    u = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(u - lse[:, None])
    if MASK:
        allowed = cols[None, :] < T
        if CAUSAL:
            allowed = allowed & (cols[None, :] <= offs_m[:, None])
        p = tl.where(allowed, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.autotune(configs=_DQ_CONFIGS, key=["T_BUCKET", "HEAD_DIM", "CAUSAL"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb,
    stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt, H, T,
    T_BUCKET,  # autotune key: T rounded up to a power of two (a new T does not re-tune)
    N_REP, qk_scale, sm_scale, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // N_REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < T
    ld_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=ld_mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=ld_mask, other=0.0
    )
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    if CAUSAL:
        full_hi = pid_m * BLOCK_M
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        full_hi = (T // BLOCK_N) * BLOCK_N
        hi = T
    for start_n in range(0, full_hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n, offs_d, T,
            qk_scale, HEAD_DIM, False, CAUSAL, DOT_PREC,
        )
    for start_n in range(full_hi, hi, BLOCK_N):
        dq = _dq_block(
            dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_n, offs_m, offs_n, offs_d, T,
            qk_scale, HEAD_DIM, True, CAUSAL, DOT_PREC,
        )
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=ld_mask,
    )


# ---------------------------------------------------------------------------------------------------------
# host side


def _check(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"flash_attention wants 4-d (B, H, T, D) tensors, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    if k.shape != v.shape or k.size(0) != B or k.size(2) != T or k.size(3) != D:
        raise ValueError(
            f"k/v must be (B, H_kv, T, D) matching q {tuple(q.shape)}: got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)} (decode steps with Tq != Tk go through sdpa)"
        )
    if H % k.size(1):
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({k.size(1)})")
    if D > MAX_HEAD_DIM or D < 1:
        raise ValueError(
            f"head dim {D} is not supported by the Triton kernel (1..{MAX_HEAD_DIM}; 64 and 128 are "
            "the tuned ones); use model.attention=sdpa"
        )
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of float16/bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before import)")


def _last_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _meta(q):
    D = q.size(-1)
    # tl.arange needs a power of two and tl.dot an inner dim >= 16: pad the head dim with masked lanes
    d_pad = max(16, triton.next_power_of_2(D))
    # fp32 goes through exact fp32 dots (tf32 would cost it ~3 decimal digits); half types use tensor cores
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"
    return D, d_pad, dot_prec


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, return_entropy):
        q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
        B, H, T, _ = q.shape
        n_rep = H // k.size(1)
        D, d_pad, dot_prec = _meta(q)
        sm_scale = 1.0 / math.sqrt(D)
        # out (B, H, T, D) as a view of (B, T, H, D) memory, the layout the model wants next: its
        # y.transpose(1, 2).reshape(B, T, C) is then a view, not a copy that c_proj would keep for its backward
        # (2 bytes a token and width per layer under autocast, beyond the memory estimate). The kernels read
        # and write o through its strides (the last dim stays contiguous), the backward's delta kernel too.
        o = torch.empty((B, T, H, q.size(-1)), device=q.device, dtype=q.dtype).transpose(1, 2)
        lse = torch.empty((B * H, T), device=q.device, dtype=torch.float32)
        ent = torch.empty((B, H, T), device=q.device, dtype=torch.float32) if return_entropy else lse

        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

        _fwd_kernel[grid](
            q, k, v, o, lse, ent, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], H, T,
            triton.next_power_of_2(T),  # T_BUCKET
            n_rep, sm_scale * LOG2E, HEAD_DIM=D, D_PAD=d_pad, CAUSAL=causal, RETURN_ENTROPY=return_entropy,
            DOT_PREC=dot_prec,
        )
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        if return_entropy:
            ctx.mark_non_differentiable(ent)
            return o, ent
        return o

    @staticmethod
    def backward(ctx, do, *_unused_dent):
        q, k, v, o, lse = ctx.saved_tensors
        do = _last_contig(do)
        B, H, T, _ = q.shape
        H_kv = k.size(1)
        n_rep = H // H_kv
        D, d_pad, dot_prec = _meta(q)
        sm_scale = 1.0 / math.sqrt(D)
        delta = torch.empty((B * H, T), device=q.device, dtype=torch.float32)
        delta_block = 16 if _INTERPRET else 64  # rows per program of the tiny delta kernel
        _bwd_delta_kernel[(triton.cdiv(T, delta_block), B * H)](
            o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T, HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=delta_block
        )
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)

        def grid_kv(meta):
            return (triton.cdiv(T, meta["BLOCK_N"]), B * H_kv)

        _bwd_dkdv_kernel[grid_kv](
            q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], H, H_kv, T,
            triton.next_power_of_2(T),  # T_BUCKET
            n_rep, sm_scale * LOG2E, sm_scale, HEAD_DIM=D, D_PAD=d_pad, CAUSAL=ctx.causal, DOT_PREC=dot_prec,
        )

        def grid_q(meta):
            return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

        _bwd_dq_kernel[grid_q](
            q, k, v, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
            *dq.stride()[:3], H, T,
            triton.next_power_of_2(T),  # T_BUCKET
            n_rep, sm_scale * LOG2E, sm_scale, HEAD_DIM=D, D_PAD=d_pad, CAUSAL=ctx.causal, DOT_PREC=dot_prec,
        )
        return dq, dk, dv, None, None


# fmt: on


def flash_attention(q, k, v, causal: bool = True, return_entropy: bool = False):
    """Fused attention. q (B, H, T, D); k, v (B, H_kv, T, D) -> out (B, H, T, D) in q's dtype, and with
    return_entropy also the per-row attention entropy (B, H, T), float32, in nats, without gradient."""
    _check(q, k, v)
    return _FlashAttention.apply(q, k, v, bool(causal), bool(return_entropy))
