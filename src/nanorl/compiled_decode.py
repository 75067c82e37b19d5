"""One decode step of a GPT as a single compiled graph: the engine's CPU fast path (`Engine(compile=True)`,
config `engine.compile`).

Why: an eager CPU decode step of the benchmark model (16 rows, 4 layers, width 256) dispatches ~200 kernels
and ~140 views, and about 40% of its 6.45 ms is that per-op cost, not arithmetic (docs/benchmarks.md, "Fifth
session"). `torch.compile` fuses each layer's norms, rotary, attention softmax, ReLU² and residual adds into a
few C++ loops around the matmuls.

What makes it compile well, each measured:
- the graph never writes its inputs: it returns each layer's new key and value and the caller stores them
  (`KVCache.append`). Writing the cache inside the graph made inductor copy the whole cache every step
  (8.1 ms a step against 4.9 without).
- the new position's own score is a dot product, outside the cached keys, so the cached part is a plain
  slice whose length is a dynamic dimension: one graph serves every step and every prompt length.
- matmuls as (W·xᵀ)ᵀ, as `InferenceLinear` does in eager mode (MKL splits few-row products badly the other
  way round).

The layout is the engine's shared one (`KVCache.share`): P prompts stored once in `prefix`, B = P·G rows with
their own positions after. The math is the model's, term for term (rms_norm, then the rotation; attention
over prompt, own keys and the new key; ReLU²; the soft-cap as 2c·sigmoid(2z/c) − c);
tests/test_compiled_decode.py checks its logits against the float64 model and its samples against the eager
engine's.

Dynamo specialises sizes 0 and 1, so the engine decodes a row's first two own positions eagerly, and P = 1 or
G = 1 is a graph of its own. A graph is compiled once per process and layout: 20-40 s on 2 cores, 7-8 s when
inductor's on-disk cache already holds it. Hence opt-in: it pays where sampling takes minutes.
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F

from nanorl.model.gpt import NORM_EPS

log = logging.getLogger(__name__)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)  # the model's epsilon, whatever the dtype


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(w, x.t()).t()


def decode_step(tok, cos, sin, prefix_k, prefix_v, prefix_bias, own_k, own_v, wte, layers, lm_head, n_head, softcap):
    """Logits (B, V), soft-capped, for the next position of every row, and the new keys/values (depth, B,
    H_kv, D).

    tok (B,) the rows' newest tokens; cos, sin (1, 1, D/2) the rotary tables at their position; prefix_k/v
    (depth, P, H_kv, Lp, D) the prompts, prefix_bias (P, Lp) 0 or -inf (padding); own_k/v (depth, B, H_kv, t,
    D) the rows' cached positions; layers: per block (W_qkv, W_attn_out, W_fc, W_mlp_out)."""
    B = tok.size(0)
    _, P, Hkv, Lp, D = prefix_k.shape
    G, rep = B // P, n_head // Hkv
    scale = D**-0.5
    half = D // 2
    x = _rms(F.embedding(tok, wte))
    new_k, new_v = [], []
    for i, (w_qkv, w_o, w_fc, w_fp) in enumerate(layers):
        qkv = _linear(_rms(x), w_qkv)
        qk = _rms(qkv[:, : (n_head + Hkv) * D].reshape(B, n_head + Hkv, D))
        x1, x2 = qk[..., :half], qk[..., half:]
        qk = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], -1)
        q, k = qk[:, :n_head].reshape(B, Hkv, rep, D), qk[:, n_head:]
        v = qkv[:, (n_head + Hkv) * D :].reshape(B, Hkv, D)
        # scores over the prompt (each prompt's keys once for its G rows), the row's own keys, the new key
        s_pre = torch.einsum("pgkrd,pkld->pgkrl", q.view(P, G, Hkv, rep, D), prefix_k[i])
        s_pre = s_pre + prefix_bias[:, None, None, None, :]
        s_own = torch.einsum("bkrd,bksd->bkrs", q, own_k[i])
        s_new = (q * k[:, :, None, :]).sum(-1, keepdim=True)
        p = torch.softmax(torch.cat([s_pre.reshape(B, Hkv, rep, Lp), s_own, s_new], -1) * scale, -1)
        y = torch.einsum("pgkrl,pkld->pgkrd", p[..., :Lp].reshape(P, G, Hkv, rep, Lp), prefix_v[i])
        y = y.reshape(B, Hkv, rep, D) + torch.einsum("bkrs,bksd->bkrd", p[..., Lp:-1], own_v[i])
        y = y + p[..., -1:] * v[:, :, None, :]
        x = x + _linear(y.reshape(B, n_head * D), w_o)
        x = x + _linear(F.relu(_linear(_rms(x), w_fc)).square(), w_fp)
        new_k.append(k)
        new_v.append(v)
    z = _linear(_rms(x), lm_head)
    if softcap > 0:
        z = torch.sigmoid(z * (2.0 / softcap)) * (2.0 * softcap) - softcap
    # row-major (z is the transposed matmul output): the sampler's reductions over the vocabulary are 4-40x
    # slower across a strided dim, and inductor writes this copy in the soft-cap's loop (a copy after the
    # graph cost 280 us a step; sampling inside the graph measured no faster, its cumsum runs as an aten op)
    return z.contiguous(), torch.stack(new_k), torch.stack(new_v)


_compiled = None  # one torch.compile wrapper per process: its graphs serve every engine and model


def _compiled_step():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(decode_step, dynamic=False, fullgraph=True)
    return _compiled


def _mark_dynamic(tok, prefix_k, prefix_v, prefix_bias, own_k, own_v) -> None:
    """The sizes that change between calls: rows (B), prompts (P), prompt length (Lp), own positions (t).
    Everything else (the weights, heads, widths) stays a constant of the graph, which keeps its loops
    vectorisable; `maybe_` because dynamo specialises a size of 1 (P = 1 is a graph of its own)."""
    mark = torch._dynamo.maybe_mark_dynamic
    mark(tok, 0)
    for t in (prefix_k, prefix_v):
        mark(t, 1)
        mark(t, 3)
    mark(prefix_bias, 0)
    mark(prefix_bias, 1)
    for t in (own_k, own_v):
        mark(t, 1)
        mark(t, 3)


class CompiledDecoder:
    """Runs `decode_step` compiled for a model and a shared KVCache; `usable(cache)` says when it applies.

    If compiling fails (no C++ compiler, an unsupported build), it logs why once and reports itself unusable,
    and the engine decodes eagerly: a missing compiler costs speed, never a run."""

    def __init__(self, model):
        self.model = model
        self.failed: str | None = None
        # what stays fixed while one KV cache is decoded (weights cannot change inside Engine.sample): the cache,
        # the prompts' additive mask, the weights (gathering them took 110 us, 2% of a step)
        self._session: tuple | None = None

    def usable(self, cache) -> bool:
        return (
            self.failed is None
            and cache.prefix is not None
            and cache.k.device.type == "cpu"
            and cache.pos - cache.offset >= 2  # dynamo specialises own lengths 0 and 1
            and cache.batch_size >= 2  # one row would be a graph (and a compile) of its own, for little gain
        )

    def _start(self, cache) -> tuple:
        m = self.model
        pk, pv, mask = cache.prefix
        bias = torch.zeros(pk.size(1), pk.size(3), dtype=pk.dtype, device=pk.device)
        if mask is not None:
            bias.masked_fill_(~mask, float("-inf"))
        weights = (m.wte.weight.detach(), m.inference_weights(), m.lm_head.weight.detach())
        return weakref.ref(cache), bias, weights  # weak: a finished sample's cache is freed

    def __call__(self, tok: torch.Tensor, cache) -> torch.Tensor | None:
        """Logits (B, V) after feeding tok (B,) at the cache's position, the cache advanced; None if compiling
        failed (nothing was changed: decode this step eagerly)."""
        if self._session is None or self._session[0]() is not cache:
            self._session = self._start(cache)
        _, bias, (wte, layers, lm_head) = self._session
        m = self.model
        pk, pv, _ = cache.prefix
        t = cache.pos - cache.offset
        cos, sin = m._rotary(cache.pos, cache.pos + 1)
        args = (pk, pv, bias, cache.k[:, :, :, :t], cache.v[:, :, :, :t])
        _mark_dynamic(tok, *args)
        try:
            logits, k, v = _compiled_step()(
                tok, cos.to(pk.dtype), sin.to(pk.dtype), *args, wte, layers, lm_head, m.config.n_head, m.softcap
            )
        except Exception as e:  # a compiler problem: say so once, then decode eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("compiled decoding is unavailable (%s); decoding eagerly", self.failed)
            return None
        cache.append(k, v)
        return logits
