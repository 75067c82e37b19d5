"""Attention dispatch: the one function the model calls, and the three backends behind it.

    triton  the fused flash-attention kernel in `kernels/` (default on CUDA); entropy comes free from the kernel
    sdpa    torch.nn.functional.scaled_dot_product_attention (default on CPU and MPS)
    eager   q·kᵀ -> softmax -> ·v with the probabilities materialised (slow, T×T memory); used to look at
            attention maps on a small probe batch, and as the readable reference the others are tested against

All take q (B, H, Tq, D) and k, v (B, H_kv, Tk, D) with H a multiple of H_kv (grouped-query attention).
`causal` aligns the mask bottom-right: query i (of Tq) sits at absolute position Tk - Tq + i, so the same call
serves training (Tq == Tk), a prefill into an empty KV cache, and decoding against a cache.

Entropy (`return_entropy=True`) is the Shannon entropy of every query row's attention distribution, (B, H, Tq),
in nats, float32, detached: it is telemetry, no gradient flows through it. The triton backend computes it
inside the kernel; sdpa has no such output, so it is computed exactly by a second pass over q·kᵀ in chunks of
query rows (never more than a chunk×Tk block of scores at once); eager has the probabilities already.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKENDS = ("triton", "sdpa", "eager")

# Query rows per chunk of the sdpa entropy pass: bounds its scratch memory to B·H·256·Tk floats.
_ENTROPY_CHUNK = 256


def resolve_backend(name: str, device: torch.device | str) -> str:
    """`auto` -> triton on CUDA (when triton imports), sdpa elsewhere; explicit names are checked."""
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda":
            try:
                import triton  # noqa: F401
            except ImportError:  # pragma: no cover - a CUDA torch without triton
                return "sdpa"
            return "triton"
        return "sdpa"
    if name not in BACKENDS:
        from nanorl.api import NanorlError

        raise NanorlError(
            f"unknown attention backend {name!r}", hint=f"choose auto or one of {', '.join(BACKENDS)}", exit_code=2
        )
    if name == "triton" and device_type != "cuda":
        import os

        if os.environ.get("TRITON_INTERPRET") != "1":
            from nanorl.api import NanorlError

            raise NanorlError(
                "model.attention=triton needs a CUDA device",
                hint="use model.attention=auto (sdpa on CPU), or set TRITON_INTERPRET=1 to run the "
                "kernel in Triton's (slow) interpreter",
            )
    return name


def _causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask (True = may attend), (tq, tk)."""
    qpos = torch.arange(tk - tq, tk, device=device)[:, None]
    return torch.arange(tk, device=device)[None, :] <= qpos


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv·n_rep, T, D), each kv head serving n_rep consecutive query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eager_attention(q, k, v, causal: bool = True, return_probs: bool = False):
    """Materialise the attention probabilities. Returns (out, probs) where probs is (B, H, Tq, Tk) in float32,
    or float64 for float64 inputs (the scores and softmax never drop below the input's precision: this is the
    reference the other backends are checked against)."""
    tq, tk = q.size(2), k.size(2)
    n_rep = q.size(1) // k.size(1)
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if causal:
        scores = scores.masked_fill(~_causal_mask(tq, tk, q.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    out = (probs.to(v.dtype) @ v).to(q.dtype)
    return out, (probs if return_probs else None)


def entropy_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dim; 0·log 0 counts as 0."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)


@torch.no_grad()
def chunked_entropy(q, k, causal: bool = True, chunk: int = _ENTROPY_CHUNK) -> torch.Tensor:
    """Exact attention entropy without the full T×T matrix: H = logsumexp(s) - Σ softmax(s)·s, chunk by chunk.

    The scores are taken relative to their row's maximum first (H does not change): the difference of two large
    float32 numbers, logsumexp(s) and Σ p·s, lost precision as the scores grew (1e-4 at 30× typical scores)."""
    tq, tk = q.size(2), k.size(2)
    k = _repeat_kv(k, q.size(1) // k.size(1)).float()
    scale = 1.0 / math.sqrt(q.size(-1))
    mask = _causal_mask(tq, tk, q.device) if causal else None  # built once, sliced by chunk
    out = []
    for i in range(0, tq, chunk):
        s = (q[:, :, i : i + chunk].float() @ k.transpose(-2, -1)) * scale
        if mask is not None:
            s = s.masked_fill(~mask[i : i + chunk], float("-inf"))
        s = s - s.amax(-1, keepdim=True)  # every row sees at least its own key: a finite maximum
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - lse)
        # masked entries have p == 0 and s == -inf; nan_to_num turns their 0·(-inf) into 0
        out.append(lse.squeeze(-1) - torch.nan_to_num(p * s, nan=0.0).sum(-1))
    return torch.cat(out, dim=-1)


def attention(q, k, v, causal: bool = True, backend: str = "sdpa", return_entropy: bool = False, key_mask=None):
    """The attention every layer calls. Returns out (B, H, Tq, D), or (out, entropy) with return_entropy.

    `key_mask` (B, >= Tk) bool, True for real keys (added by the stages engineer for ragged batches: the engine
    left-pads prompts of different lengths into one batch and masks the padding; rotary is relative, so the
    shift changes nothing else). A query always sees its own position, so a padding query has one key and
    stays finite (a NaN there would leak through 0-weighted products). sdpa only, no entropy.
    """
    tq, tk = q.size(2), k.size(2)
    if key_mask is not None:
        if return_entropy:
            raise NotImplementedError("return_entropy with a key_mask")
        own = torch.arange(tk, device=q.device)[None, :] == torch.arange(tk - tq, tk, device=q.device)[:, None]
        allowed = key_mask[:, None, None, :tk] | own
        if causal:
            allowed = allowed & _causal_mask(tq, tk, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=q.size(1) != k.size(1))
    if backend == "triton" and tq == tk:
        from nanorl.model.kernels import flash_attention

        return flash_attention(q, k, v, causal=causal, return_entropy=return_entropy)
    if backend == "eager":
        out, probs = eager_attention(q, k, v, causal=causal, return_probs=return_entropy)
        return (out, entropy_from_probs(probs).detach()) if return_entropy else out

    # sdpa (and triton's decode steps, Tq != Tk, which the kernel does not handle: a decode step is tiny)
    gqa = q.size(1) != k.size(1)
    if not causal or tq == 1:
        # one new query attends to the whole cache: no mask at all
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif tq == tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        # several new queries against a longer cache: sdpa's is_causal is top-left aligned, so pass the mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(tq, tk, q.device), enable_gqa=gqa)
    if return_entropy:
        return out, chunked_entropy(q, k, causal=causal)
    return out


def shared_prefix_attention(q, pk, pv, k, v, prefix_mask=None, return_entropy: bool = False):
    """Attention of rows that share a prompt: each of P prompts' keys/values are stored once and serve its
    G = B / P rows (rows p·G .. p·G + G - 1), followed by each row's own keys/values.

    q (B, H, T, D): the rows' T newest positions; pk, pv (P, H_kv, Lp, D): the prompts; prefix_mask (P, Lp) bool,
    True for real keys (left padding), or None; k, v (B, H_kv, S, D): the rows' own positions so far, the
    queries' among them (the last T). Every query sees its whole prompt and, causally, its own row.
    Returns out (B, H, T, D), or (out, entropy (B, H, T)) with return_entropy.

    The prompt part is one matmul per prompt and kv head over all its rows' queries, so its keys/values are read
    once per group instead of once per row. Both parts' scores are laid out (prompt, kv head, row, query, key),
    where the prompt's scores are already contiguous and one `cat` places the rows' own, so that one softmax
    covers both and each half of the probabilities feeds its matmul without a copy. Eager (scores
    materialised): meant for decoding, where T is small.
    """
    B, H, T, D = q.shape
    P, Hkv, Lp, _ = pk.shape
    if _CPU_FLASH is not None and q.device.type == "cpu" and T == 1 and Hkv == H and not return_entropy:
        return _cpu_decode_shared(q, pk, pv, k, v, prefix_mask)
    G, M, S = B // P, (H // Hkv) * T, k.size(2)  # M: the query rows per (row, kv head): rep heads x T
    q = (q * (1.0 / math.sqrt(D))).reshape(B, Hkv, M, D)
    s_pre = (q.view(P, G, Hkv, M, D).transpose(1, 2).reshape(P, Hkv, G * M, D) @ pk.transpose(-2, -1)).view(
        P, Hkv, G, M, Lp
    )
    if prefix_mask is not None:
        s_pre = s_pre.masked_fill(~prefix_mask[:, None, None, None, :], float("-inf"))
    s_own = q @ k.transpose(-2, -1)  # (B, H_kv, M, S)
    if T > 1:
        s_own = s_own.masked_fill(~_causal_mask(T, S, q.device).repeat(M // T, 1), float("-inf"))
    scores = torch.cat([s_pre, s_own.view(P, G, Hkv, M, S).transpose(1, 2)], dim=-1)  # (P, H_kv, G, M, Lp + S)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # the softmax in float32
    probs = scores.softmax(dim=-1)
    p = probs.to(v.dtype)
    out_pre = p[..., :Lp].reshape(P, Hkv, G * M, Lp) @ pv  # a view: no copy
    out_own = p[..., Lp:].transpose(1, 2).reshape(B, Hkv, M, S) @ v
    out = out_own.view(P, G, Hkv, M, D) + out_pre.view(P, Hkv, G, M, D).transpose(1, 2)
    out = out.view(B, H, T, D).to(q.dtype)
    if return_entropy:
        ent = entropy_from_probs(probs).transpose(1, 2).reshape(B, H, T)
        return out, ent.float().detach()
    return out


# PyTorch's fused CPU attention that also returns the log-sum-exp (an aten op since torch 2.2; None if absent)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _cpu_decode_shared(q, pk, pv, k, v, prefix_mask):
    """shared_prefix_attention for a CPU decode step (T = 1, as many kv heads as heads): each part through
    PyTorch's fused CPU attention, which also returns each query's log-sum-exp, and the two parts merged by
    their softmax masses: out = w·out_prompt + (1 - w)·out_own, w = sigmoid(lse_prompt - lse_own)."""
    B, H, _, D = q.shape
    P = pk.size(0)
    G = B // P
    mask = None
    if prefix_mask is not None:  # the op takes an additive mask of q's dtype
        mask = torch.zeros(prefix_mask.shape, dtype=q.dtype).masked_fill_(~prefix_mask, float("-inf"))[:, None, None]
    out_pre, lse_pre = _CPU_FLASH(q.view(P, G, H, D).transpose(1, 2), pk, pv, attn_mask=mask)  # (P, H, G, ·)
    out_own, lse_own = _CPU_FLASH(q, k, v)  # (B, H, 1, ·)
    # merged in the prompt-major layout (P, G, H, ·), where the prompt part's outputs are transposed views
    # (the log-sum-exps are float32 whatever q's dtype; lerp takes one dtype: a bf16 model failed here)
    w = torch.sigmoid(lse_pre.transpose(1, 2) - lse_own.view(P, G, H))[..., None].to(q.dtype)
    return torch.lerp(out_own.view(P, G, H, D), out_pre.transpose(1, 2), w).view(B, H, 1, D)
