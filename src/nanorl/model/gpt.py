"""The GPT every stage trains: nanochat's architecture, written for this project.

- token embedding -> RMSNorm -> `depth` blocks -> RMSNorm -> lm_head -> soft-capped logits
- each block: x += attn(norm(x)); x += mlp(norm(x)) (pre-norm residual)
- attention: rotary position embeddings on q and k, then QK-norm, grouped-query attention (n_kv_head kv heads)
- MLP: 4× width with ReLU² (relu(x)²)
- RMSNorm has no learned weights; no Linear has a bias; input and output embeddings are untied
- logits are soft-capped, cap·tanh(z / cap), which keeps them in (-cap, cap) (model.softcap, nanochat uses 15)

Shapes follow the depth rule in `nanorl.config` (width 64·depth rounded up to a multiple of 128, heads of
128); the model reads a resolved `ModelConfig` where n_embd/n_head/n_kv_head are already filled in.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanorl.model.attention import attention, eager_attention, resolve_backend, shared_prefix_attention
from nanorl.model.counts import LOSS_CHUNK_ELEMENTS, count_params, flops_per_token

# Rotary base frequency (RoFormer, Su et al. 2021; nanochat uses the same 10000).
ROPE_BASE = 10000.0

# The epsilon of every RMSNorm (the residual norms and QK-norm, here and in nanorl.compiled_decode), one value
# whatever the dtype, passed explicitly. The hand-written norms used to add the input dtype's machine epsilon:
# 1.2e-7 for float32 but 2^-7 = 0.0078 for the bf16 q and k of a GPU run under autocast (_RopeNorm), which at a
# pre-norm RMS of 0.1 (mean square 0.01) shrank the normed q and k by 25%: the GPU trained a different model
# from the CPU. (F.rms_norm's default is float32's epsilon for bf16 and float32, float64's for float64.)
# float32's epsilon is what every float32 run (every CPU run, every checkpoint trained on one) has used, so
# those keep their numbers exactly; the mean of squares is always taken in >= float32, where it is representable.
NORM_EPS = torch.finfo(torch.float32).eps


class _RMSNorm(torch.autograd.Function):
    """y = x / sqrt(mean(x²) + eps) over the last dim, with a hand-written backward that keeps only y and the
    per-row 1/rms. On the CPU, F.rms_norm is a composite whose autograd backward took several times as long as
    this one on the benchmark shape; on CUDA it is a fused kernel and is used as is.
    Backward: dx = r·(g - y·mean(g·y)), r = 1/rms."""

    @staticmethod
    def forward(ctx, x):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # the mean of squares in >= float32
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(NORM_EPS)).to(x.dtype)
        y = x * r
        ctx.save_for_backward(y, r)  # y is also the next matmul's saved input: no extra memory
        return y

    @staticmethod
    def backward(ctx, g):
        y, r = ctx.saved_tensors
        return torch.addcmul(g, y, (g * y).mean(-1, keepdim=True), value=-1.0).mul_(r)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, without learned weights (eps: NORM_EPS, whatever the dtype).
    The hand-written autograd node only where a backward can follow: without one, F.rms_norm is the faster
    (48 vs 21 us a call at a 16-row decode step)."""
    if x.device.type == "cpu" and torch.is_grad_enabled():
        return _RMSNorm.apply(x)
    return F.rms_norm(x, (x.size(-1),), eps=NORM_EPS)


def _cpu_inference(x: torch.Tensor) -> bool:
    """No gradient on the CPU: sampling, evaluation, RL's reference/old log-probs."""
    return x.device.type == "cpu" and not torch.is_grad_enabled()


class _DerivedWeight:
    """A tensor made from parameters (a concatenation, a transpose), cached for no-gradient CPU passes and made
    again whenever a source changed: an optimizer step or load_state_dict bumps its in-place version counter,
    .to() gives it new storage."""

    def __init__(self, make):
        self.make = make
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    def get(self, *params: torch.Tensor) -> torch.Tensor:
        key = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        if key != self.key:
            self.value, self.key = self.make(*params).detach(), key
        return self.value


# Row counts for which a no-gradient CPU matmul runs as (W·xᵀ)ᵀ (see InferenceLinear)
_FEW_ROWS = range(2, 257)


class InferenceLinear:
    """y = x·Wᵀ for a no-gradient CPU pass, W the concatenation of `params` along the output dim (q, k and v in
    one matmul beat three), in the layout that suits the row count.

    Why the layout matters: MKL splits x·Wᵀ with few rows badly over threads. At 16 rows (a decode step) and 2
    threads, (W·xᵀ)ᵀ, which hands MKL the weight as the tall operand, ran the 8192 x 256 lm_head in 613 us
    against 1,128 for x @ Wᵀ (Wᵀ stored contiguous) and 1,256 for F.linear, and the blocks' matrices 20-40%
    faster with the weights out of cache; at one thread the two are even. The result is a transposed view,
    which elementwise ops take as is (the logits are written row-major by their first pass: GPT._logits).
    From a few hundred rows on x @ Wᵀ with Wᵀ stored contiguous is as fast or faster, and one row is a
    matrix-vector product, where it wins too (docs/benchmarks.md, "Fifth session")."""

    def __init__(self):
        self._w = _DerivedWeight(lambda *ws: torch.cat(ws))
        self._wt = _DerivedWeight(lambda *ws: torch.cat(ws).t().contiguous())

    def weight(self, *params: torch.Tensor) -> torch.Tensor:
        """W: the one parameter, or the cached concatenation of several."""
        return params[0] if len(params) == 1 else self._w.get(*params)

    def __call__(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if rows in _FEW_ROWS:
            w = self.weight(*params)
            return torch.mm(w, x.reshape(rows, x.size(-1)).t()).t().view(*x.shape[:-1], w.size(0))
        return x @ self._wt.get(*params)


def rotary_tables(seq_len: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim / 2), float32: position t turns the channel pair (i, i + D/2) by the
    angle t·base^(-2i/D)."""
    inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotary embedding of x (..., T, H, D) with tables (T, 1, D/2): (x1, x2) -> (x1·c + x2·s, x2·c - x1·s);
    `inverse` rotates the other way (the transpose, for the backward pass). Written into one fresh tensor with
    four half-size passes: no slices-and-cat, no temporaries."""
    d = x.size(-1) // 2
    sign = -1.0 if inverse else 1.0
    x1, x2 = x[..., :d], x[..., d:]
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    y1, y2 = y[..., :d], y[..., d:]
    torch.mul(x1, cos, out=y1).addcmul_(x2, sin, value=sign)
    torch.mul(x2, cos, out=y2).addcmul_(x1, sin, value=-sign)
    return y


class _RopeNorm(torch.autograd.Function):
    """QK-norm of the rotated q or k, y = rms_norm(rotate(x)), in one autograd node.

    A rotation keeps the RMS, so 1/rms comes from x directly. Backward runs the norm's backward, then the
    inverse (= transposed) rotation. Autograd of the plain formula would go through slices, a cat and six
    elementwise products, each allocating."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # the mean of squares in >= float32
        r = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(NORM_EPS)).to(x.dtype)
        y = rotate(x, cos, sin).mul_(r)
        ctx.save_for_backward(y, r, cos, sin)
        return y

    @staticmethod
    def backward(ctx, g):
        y, r, cos, sin = ctx.saved_tensors
        gz = torch.addcmul(g, y, (g * y).mean(-1, keepdim=True), value=-1.0).mul_(r)
        return rotate(gz, cos, sin, inverse=True), None, None


def rope_norm(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rms_norm(rotate(x)). A no-gradient CPU pass takes F.rms_norm (the same as the norm of the rotated x: a
    rotation keeps the RMS) and one rotation, without the autograd node's bookkeeping and casts, which at a
    16-row decode step are most of its cost (the model's decode step 6.25 -> ~6.1 ms). Elsewhere the node,
    which also keeps q and k in the input's dtype under autocast."""
    if _cpu_inference(x):
        return rotate(F.rms_norm(x, (x.size(-1),), eps=NORM_EPS), cos.to(x.dtype), sin.to(x.dtype))
    return _RopeNorm.apply(x, cos, sin)


class _ReLU2(torch.autograd.Function):
    """relu(x)², keeping relu(x) (autograd keeps the same tensor, twice referenced) and with a 2-pass backward
    dx = 2·relu(x)·g instead of autograd's four passes."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return (r + r).mul_(g)


class KVCache:
    """Keys and values of every layer for `batch_size` rows, up to `max_len` positions.

    `pos` is how many positions are filled (the same for every row). A forward pass with `kv_cache=cache`
    writes its keys/values at pos..pos+T and advances pos after the last layer.

    `share(n)` turns each row into n rows that share its filled positions (one prompt's prefill serves a group
    of n samples): on the CPU the shared keys/values are kept once per prompt in `prefix`, new positions go into
    per-row storage, and attention reads each prompt once for its n rows (`shared_prefix_attention`); on a GPU
    each row gets a copy.

    `key_mask` (optional, set by the caller): (batch, >= positions) bool, True for real keys, for batches of
    left-padded prompts of different lengths; attention then ignores the padding (no entropy). `share` moves
    it to the prefix (the rows' own positions are never padding).
    """

    def __init__(self, batch_size: int, model_cfg, max_len: int, device=None, dtype=torch.float32):
        head_dim = model_cfg.n_embd // model_cfg.n_head
        shape = (model_cfg.depth, batch_size, model_cfg.n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))
        self.max_len = max_len
        self.pos = 0
        self.key_mask: torch.Tensor | None = None
        # after share(): (keys, values) (depth, prompts, H_kv, positions, D) and the prompts' key mask or None
        self.prefix: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._offset = 0  # positions held in `prefix`; k, v start after them
        self._shared = False

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def reset(self) -> None:
        self.pos = 0

    def share(self, n: int, copy: bool | None = None) -> KVCache:
        """Row i becomes rows i·n .. i·n + n - 1, which share its filled positions; returns self. `copy`
        (default: on a GPU) gives each row its own copy instead.

        Why not copy the prompt into each row: a decode step reads every cached key and value, so copies
        multiply the memory traffic of the prompt part by n. On the GRPO benchmark shape (8 prompts of 64
        tokens, 8 samples of 64 each) sharing cut a rollout's attention from 0.23 to 0.15 s and the rollout
        from 1.05 to 0.95 s; at 1 prompt x 16 samples x 128 tokens, 1.05 -> 1.03 s (2 threads)."""
        if self._shared:
            raise ValueError("this KV cache is already shared")
        self._shared = True
        P = self.pos
        depth, B, Hkv, _, D = self.k.shape
        if copy if copy is not None else self.k.device.type != "cpu":
            # GPU: each row gets a copy of its prompt and decoding stays on the fused sdpa kernels (bf16 scores
            # in an eager softmax would lose precision); the shared layout is measured on the CPU only
            k = self.k.new_zeros((depth, B * n, *self.k.shape[2:]))
            v = torch.zeros_like(k)
            k[:, :, :, :P] = self.k[:, :, :, :P].repeat_interleave(n, dim=1)
            v[:, :, :, :P] = self.v[:, :, :, :P].repeat_interleave(n, dim=1)
            self.k, self.v = k, v
            self._layers = list(zip(k.unbind(0), v.unbind(0), strict=True))
            if self.key_mask is not None:
                self.key_mask = self.key_mask.repeat_interleave(n, dim=0)
            return self
        mask = self.key_mask[:, :P] if self.key_mask is not None else None
        self.prefix = (self.k[:, :, :, :P].clone(), self.v[:, :, :, :P].clone(), mask)
        self.k = self.k.new_zeros((depth, B * n, Hkv, self.max_len - P, D))
        self.v = torch.zeros_like(self.k)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))
        self.key_mask = None
        self._offset = P
        return self

    @property
    def offset(self) -> int:
        """Positions held in `prefix` (0 before `share`): position pos is k[..., pos - offset, :]."""
        return self._offset

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one position of every layer, k, v (depth, B, H_kv, D), at pos, and advance pos (the compiled
        decode step's output: nanorl.compiled_decode)."""
        if self.pos + 1 > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos + 1} positions needed, max_len is {self.max_len}")
        t = self.pos - self._offset
        self.k[:, :, :, t].copy_(k)
        self.v[:, :, :, t].copy_(v)
        self.pos += 1

    def insert(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H_kv, T, D) at pos..pos+T of `layer`; return all keys/values so far (views; after
        `share`, the rows' own ones, without the shared prefix)."""
        if self.pos + k.size(2) > self.max_len:
            raise ValueError(f"KV cache overflow: {self.pos + k.size(2)} positions needed, max_len is {self.max_len}")
        t0, T = self.pos - self._offset, k.size(2)
        # narrow/copy_ on per-layer views made once: a decode step's insert is small, and indexing
        # self.k[layer, :, :, t0:t1] costs five dispatched ops (of ~10 us each at a CPU decode step) per tensor
        kl, vl = self._layers[layer]
        kl.narrow(2, t0, T).copy_(k)
        vl.narrow(2, t0, T).copy_(v)
        return kl.narrow(2, 0, t0 + T), vl.narrow(2, 0, t0 + T)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.c_q = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self._qkv_infer, self._proj_infer = InferenceLinear(), InferenceLinear()

    def forward(self, x, cos, sin, backend, kv_cache=None, return_entropy=False):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        # q, k and v from one matmul (~15% faster than three on the CPU benchmark shape); with no gradient on the
        # CPU the concatenated weight is cached (InferenceLinear) instead of concatenated every call. A GPU decode step
        # (T = 1, no gradient) keeps three matmuls: concatenating the weights there would copy them every token.
        if _cpu_inference(x):
            qkv = self._qkv_infer(x, self.c_q.weight, self.c_k.weight, self.c_v.weight)
        elif T == 1 and not torch.is_grad_enabled():
            qkv = torch.cat((self.c_q(x), self.c_k(x), self.c_v(x)), -1)
        else:
            qkv = F.linear(x, torch.cat((self.c_q.weight, self.c_k.weight, self.c_v.weight)))
        qk, v = qkv.split([(H + Hkv) * D, Hkv * D], -1)
        # rotary, then QK-norm, for q and k in one node (both are per-head operations); heads move to dim 1 as
        # views (no copy)
        q, k = rope_norm(qk.view(B, T, H + Hkv, D), cos, sin).split([H, Hkv], 2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, Hkv, D).transpose(1, 2)
        key_mask = shared = None
        if kv_cache is not None:
            k, v = kv_cache.insert(self.layer_idx, k, v)
            key_mask = getattr(kv_cache, "key_mask", None)  # ragged batches (the engine); None otherwise
            shared = getattr(kv_cache, "prefix", None)  # a group's shared prompt (KVCache.share)
        if shared is not None:
            pk, pv, pmask = shared
            y = shared_prefix_attention(q, pk[self.layer_idx], pv[self.layer_idx], k, v, pmask, return_entropy)
        else:
            y = attention(q, k, v, causal=True, backend=backend, return_entropy=return_entropy, key_mask=key_mask)
        ent = None
        if return_entropy:
            y, ent = y
        y = y.transpose(1, 2).reshape(B, T, C)
        y = self._proj_infer(y, self.c_proj.weight) if _cpu_inference(y) else self.c_proj(y)
        return y, ent


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self._fc_infer, self._proj_infer = InferenceLinear(), InferenceLinear()

    def forward(self, x):
        if _cpu_inference(x):
            h = F.relu(self._fc_infer(x, self.c_fc.weight)).square_()
            return self._proj_infer(h, self.c_proj.weight)
        return self.c_proj(_ReLU2.apply(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, backend, kv_cache=None, return_entropy=False):
        y, ent = self.attn(norm(x), cos, sin, backend, kv_cache, return_entropy)
        x = x + y
        x = x + self.mlp(norm(x))
        return x, ent


def _softcap_loss_and_grad_(z, targets, cap, row_weights):
    """z (rows, V): raw float32 logits, overwritten. Returns (loss (rows,), dL/dz (rows, V)): the cross-entropy of
    the soft-capped logits s = cap·tanh(z/cap) (0 for targets of -1) and the gradient of L = sum_i w_i·loss_i for
    `row_weights` w (rows,) (which must be 0 where the target is -1).

    tanh is computed as 2·sigmoid(2x) - 1: a sigmoid pass costs a quarter of a tanh pass on the CPU (16 vs 57 ms
    on 4096 x 8192 float32, 2 threads). With σ = sigmoid(2z/cap): s = cap·(2σ - 1) and ds/dz = 1 - tanh² = 4σ(1-σ).
    dL/dz = w·(softmax(s) - onehot(y))·4σ(1-σ). |s| < cap, so exp(s) cannot overflow float32 for cap <= 80 and the
    logsumexp needs no max subtraction."""
    sig = z.mul_(2.0 / cap).sigmoid_()
    # exp(s) = exp(2cap·σ - cap), the affine map in one pass (add's alpha) instead of a multiply and a subtract.
    # The -cap operand is a 0-dim tensor made on z's device by a fill (new_full), not torch.tensor(-cap,
    # device=...): that one copies from host memory, a blocking host-to-device transfer on CUDA every chunk.
    # Same operands as before, so the same numbers.
    e = torch.add(sig.new_full((), -cap), sig, alpha=2.0 * cap).exp_()
    total = e.sum(-1)
    valid = targets >= 0
    safe = targets.clamp_min(0)
    rows = torch.arange(z.size(0), device=z.device)
    loss = (total.log() - (2.0 * cap * sig[rows, safe] - cap)) * valid
    # w·(softmax(s) - onehot(y))·4, the softmax's division and the weights in one pass: e·(4w/total), then -4w at y
    # (with the sum's pass saved above: 68 -> 62 ms on 2,048 x 8,192, 2 threads)
    scale = 4.0 * row_weights
    e.mul_((scale / total)[:, None])
    e[rows, safe] -= scale
    # e·σ(1-σ) in one pass, written over e: a fresh tensor would make three float32 chunks alive at once (z's
    # sigmoid, e and the result), beyond the two that train_memory budgets
    return loss, torch.ops.aten.sigmoid_backward.grad_input(e, sig, grad_input=e)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of soft-capped logits s = cap·tanh(z/cap), z (N, V) -> (N,), keeping one (N, V)
    tensor for backward: forward computes the per-row gradient dloss_i/dz_i along with the loss (the logits are
    in cache then), backward scales its rows by the incoming gradient. Plain autograd would keep tanh's and
    log_softmax's outputs (two N×V tensors) and make a dozen passes over them. The model uses it only when all N
    rows fit one loss chunk (GPT._loss); beyond, LinearSoftcapCE, which keeps no N×V tensor."""

    @staticmethod
    def forward(ctx, z, targets, cap):
        valid = (targets >= 0).float()
        loss, g = _softcap_loss_and_grad_(z.to(torch.float32, copy=True), targets, cap, valid)
        ctx.save_for_backward(g)
        ctx.in_dtype = z.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (g,) = ctx.saved_tensors
        return g.mul_(grad_loss[:, None]).to(ctx.in_dtype), None, None  # backward runs once: g is free to reuse


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head's matmuls run in: autocast's when it is on for x's device, else x's. A device
    without autocast (meta, where tests trace the real GPU shapes) counts as off."""
    dev = x.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _autocast_off(device_type: str):
    """A context with autocast off (the loss's matmuls cast by hand), nothing on a device without autocast."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class FusedLinearSoftcapCE(torch.autograd.Function):
    """The cross-entropy of cap·tanh(x·Wᵀ / cap) over the targets != -1, never holding all the logits.

    Returns (loss, per-row loss): with `row_weights` None, loss is the mean over the counted rows; with
    row_weights w (N,), loss = sum_i w_i·loss_i (a weighted sum: the caller normalises; GRPO's gradient at
    ratio 1 is such a sum). The per-row loss (N,) is detached.

    Plain autograd keeps the logits, their tanh and their log-softmax (three N×V float32 tensors: 17 GB each
    for 32 rows × 2048 tokens × 65,536 vocab) and makes ~15 passes over them. Here the rows go through in
    chunks: a chunk's logits are made, turned into loss and dL/dlogits in place while cache-resident, and pushed
    straight through the lm_head's backward (dx = g·W, dW += gᵀ·x). Forward keeps only dx (N×C) and dW (V×C);
    backward scales them by the incoming gradient, a scalar, so this is exact whatever is done with the loss.
    The price: the lm_head backward runs inside forward (only when grad is enabled).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, cap, row_weights):
        # under autocast the matmuls run in the autocast dtype; the softmax math always runs in float32
        dev = x.device.type
        mm_dtype = _matmul_dtype(x)
        xm, wm = x.to(mm_dtype), weight.to(mm_dtype)
        N, V = x.size(0), weight.size(0)
        chunk = _loss_chunk_rows(dev, V)
        valid = (targets >= 0).float()
        if row_weights is None:
            w, denom = valid, valid.sum().clamp_min(1)
        else:
            w, denom = row_weights.float() * valid, torch.ones((), device=x.device)
        losses = torch.empty(N, device=x.device, dtype=torch.float32)
        dx = torch.empty(x.shape, device=x.device, dtype=mm_dtype)
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        with _autocast_off(dev):
            for i in range(0, N, chunk):
                xc = xm[i : i + chunk]
                losses[i : i + chunk], g = _softcap_loss_and_grad_(
                    (xc @ wm.t()).float(), targets[i : i + chunk], cap, w[i : i + chunk]
                )
                _lm_head_backward_(g, xc, wm, dx[i : i + chunk], dw)
                del g  # else the last chunk's gradient lives on through the next chunk's logits and softmax
        ctx.save_for_backward(dx, dw, denom)
        ctx.dtypes = (x.dtype, weight.dtype)
        ctx.mark_non_differentiable(losses)
        return (losses * w).sum() / denom, losses

    @staticmethod
    def backward(ctx, grad, _grad_losses):
        dx, dw, denom = ctx.saved_tensors
        scale = grad.float() / denom
        return (dx * scale).to(ctx.dtypes[0]), (dw * scale).to(ctx.dtypes[1]), None, None, None


def _lm_head_backward_(g, xc, wm, dx_rows, dw):
    """Push a chunk's dL/dlogits g (rows, V) back through the lm_head: dx_rows = g·W (written), dW += gᵀ·x (in
    float32, added into dw). g is cast to the matmul dtype first, as the forward's matmul ran in it."""
    g = g.to(wm.dtype)
    torch.mm(g, wm, out=dx_rows)
    if wm.dtype == torch.float32:
        dw.addmm_(g.t(), xc)
    else:
        dw += (g.t() @ xc).float()


def _softcap_ce(z, targets, cap):
    """Per-position loss through plain autograd ops: the reference, and the gradient of a chunk whose softcap is
    outside (0, 80] (`_logits_grad`)."""
    s = z.float()
    if cap > 0:
        s = torch.tanh(s / cap) * cap
    return F.cross_entropy(s, targets, ignore_index=-1, reduction="none")


def _loss_chunk_rows(device_type: str, vocab: int) -> int:
    """Rows per chunk of every loss over the lm_head: LOSS_CHUNK_ELEMENTS[device] logits at most (read at each
    call: tests and bench/model_speed.py change it)."""
    return max(1, LOSS_CHUNK_ELEMENTS.get(device_type, LOSS_CHUNK_ELEMENTS["cuda"]) // vocab)


def _softcap_nll_(z, targets, cap):
    """Per-row loss (rows,) of raw float32 logits z (rows, V), which it overwrites (no autograd): _softcap_ce's
    arithmetic, op for op, in place."""
    s = z.div_(cap).tanh_().mul_(cap) if cap > 0 else z
    return F.cross_entropy(s, targets, ignore_index=-1, reduction="none")


def _logits_grad(z, targets, cap, row_weights):
    """dL/dz (rows, V) for L = sum_i w_i·loss_i of raw float32 logits z (overwritten), w 0 where the target is
    -1: the hand-written pass for a softcap in (0, 80], autograd of _softcap_ce otherwise."""
    if 0 < cap <= 80:
        return _softcap_loss_and_grad_(z, targets, cap, row_weights)[1]
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        return torch.autograd.grad(_softcap_ce(z, targets, cap), z, row_weights)[0]


class LinearSoftcapCE(torch.autograd.Function):
    """Per-row cross-entropy of cap·tanh(x·Wᵀ / cap), (N,) (0 where the target is -1), with any gradient flowing
    back into it, never holding more than one chunk of logits (LOSS_CHUNK_ELEMENTS).

    For per-position losses whose use is not known at forward: GRPO's later passes (rl.ppo_epochs > 1) and its
    β > 0 passes take log-probs with gradient and build the clipped surrogate and the KL from them.
    FusedLinearSoftcapCE cannot serve them (it makes the lm_head's gradient in forward, for a scalar backward),
    and SoftcapCrossEntropy keeps an N×V gradient for backward: 17 GiB of float32 for 64 completions of 1,024
    tokens at V = 65,536, far beyond the loss chunk the GPU memory estimate budgets. Here forward makes the loss
    chunk by chunk and keeps only x (in the matmul dtype) and W; backward makes each chunk's logits again (one
    more lm_head matmul, the price of the bound), turns them into dL/dlogits with the incoming per-row gradient
    as row weights, and pushes that through the lm_head's backward (dx = g·W, dW += gᵀ·x)."""

    @staticmethod
    def forward(ctx, x, weight, targets, cap):
        dev = x.device.type
        mm_dtype = _matmul_dtype(x)
        N, V = x.size(0), weight.size(0)
        chunk = _loss_chunk_rows(dev, V)
        losses = torch.empty(N, device=x.device, dtype=torch.float32)
        with _autocast_off(dev):
            xm, wm = x.to(mm_dtype), weight.to(mm_dtype)
            for i in range(0, N, chunk):
                losses[i : i + chunk] = _softcap_nll_((xm[i : i + chunk] @ wm.t()).float(), targets[i : i + chunk], cap)
        ctx.save_for_backward(xm, weight, targets)
        ctx.cap, ctx.dtypes = cap, (x.dtype, mm_dtype)
        return losses

    @staticmethod
    def backward(ctx, grad):
        xm, weight, targets = ctx.saved_tensors
        x_dtype, mm_dtype = ctx.dtypes
        dev = xm.device.type
        N, V = xm.size(0), weight.size(0)
        chunk = _loss_chunk_rows(dev, V)
        row_w = grad.float() * (targets >= 0)
        dx = torch.empty(xm.shape, device=xm.device, dtype=mm_dtype)
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
        with _autocast_off(dev):
            wm = weight.to(mm_dtype)
            for i in range(0, N, chunk):
                xc = xm[i : i + chunk]
                g = _logits_grad((xc @ wm.t()).float(), targets[i : i + chunk], ctx.cap, row_w[i : i + chunk])
                _lm_head_backward_(g, xc, wm, dx[i : i + chunk], dw)
                del g  # as in FusedLinearSoftcapCE: not alive through the next chunk
        return dx.to(x_dtype), dw.to(weight.dtype), None, None


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if not (cfg.n_embd and cfg.n_head and cfg.n_kv_head):
            raise ValueError("GPT needs a resolved ModelConfig (run nanorl.config.derive first)")
        self.config = cfg
        self.n_layer = cfg.depth
        self.head_dim = cfg.n_embd // cfg.n_head
        self.softcap = float(cfg.softcap)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Rotary tables, precomputed once (buffers: they follow .to(); not saved in checkpoints; a model made
        # on the meta device gets them from init_weights after to_empty). Twice the context leaves room for a
        # prompt plus a long generation; longer positions grow the tables on demand (`_rotary`).
        cos, sin = rotary_tables(2 * cfg.seq_len, self.head_dim, device=self.wte.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._backend = None
        self._lm_head_infer = InferenceLinear()

    # ---- init ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: embeddings N(0, 1); matrices N(0, std) with std = min(1, sqrt(fan_out/fan_in)) /
        sqrt(fan_in) (Yang et al. 2023, arXiv 2310.17813); the residual-branch outputs (attn.c_proj,
        mlp.c_proj) zero, so every block starts as the identity; lm_head N(0, 0.001), small so the first
        logits are near uniform."""
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                fan_out, fan_in = lin.weight.shape
                nn.init.normal_(lin.weight, mean=0.0, std=min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in))
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        cos, sin = rotary_tables(self.rope_cos.size(0), self.head_dim, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The optimizer's groups: the blocks' matrices (Muon), the input embedding and the lm_head (AdamW)."""
        return {
            "matrix": [p for p in self.blocks.parameters()],
            "embedding": [self.wte.weight],
            "unembedding": [self.lm_head.weight],
        }

    def num_params(self) -> dict[str, int]:
        return count_params(self.config)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return flops_per_token(self.config, seq_len)

    def attention_backend(self) -> str:
        if self._backend is None or self._backend[0] != self.wte.weight.device:
            self._backend = (self.wte.weight.device, resolve_backend(self.config.attention, self.wte.weight.device))
        return self._backend[1]

    def _rotary(self, t0: int, t1: int):
        if t1 > self.rope_cos.size(0):
            # Outside inference mode whatever the caller runs under: the engine samples inside
            # torch.inference_mode, and tables grown there would be inference tensors, which a later training
            # forward cannot save for its backward ("Inference tensors cannot be saved for backward").
            with torch.inference_mode(False):
                cos, sin = rotary_tables(2 * t1, self.head_dim, device=self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin
        # (T, 1, D/2): broadcast over batch and heads of the (B, T, H, D) q/k
        return self.rope_cos[t0:t1, None, :], self.rope_sin[t0:t1, None, :]

    # ---- forward -------------------------------------------------------------------------------------------
    def forward(
        self, idx, targets=None, kv_cache=None, loss_reduction="mean", return_entropy=False, loss_weights=None,
        logits="all",
    ):  # fmt: skip
        """idx (B, T) token ids.

        - no targets: logits (B, T, V), float32, soft-capped (with kv_cache: for the T new positions);
          logits="last": only the last position's (B, 1, V); logits="none": None, the pass only fills kv_cache
        - targets (B, T) (negative = ignore: -1, or PyTorch's usual -100): the mean cross-entropy over the
          counted positions, or with loss_reduction="none" the per-position loss (B, T) (0 where ignored)
        - targets and loss_weights (B, T): (sum of loss_weights·loss over the counted positions, the per-position
          loss (B, T) detached), the weighted sum through the fused loss when a backward can follow
        - return_entropy=True: returns (output, entropy) with entropy (n_layer, B, n_head, T) float32, the
          attention entropy of every query row in nats (telemetry; detached)
        """
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none', not {loss_reduction!r}")
        if logits not in ("all", "last", "none") or (logits != "all" and targets is not None):
            raise ValueError(f"logits must be 'all', or 'last' / 'none' without targets, not {logits!r}")
        if loss_weights is not None and targets is None:
            raise ValueError("loss_weights needs targets")
        B, T = idx.shape
        t0 = kv_cache.pos if kv_cache is not None else 0
        cos, sin = self._rotary(t0, t0 + T)
        backend = self.attention_backend()
        x = norm(self.wte(idx))
        entropies = []
        for block in self.blocks:
            x, ent = block(x, cos, sin, backend, kv_cache, return_entropy)
            if return_entropy:
                entropies.append(ent)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None and logits != "all":
            out = None if logits == "none" else self._logits(norm(x[:, -1:]))
        elif targets is None:
            out = self._logits(norm(x))
        else:
            # every negative target is ignored, on every path: the hand-written passes count targets >= 0, but
            # cross_entropy (validation, a softcap beyond 80) ignores only -1, and raised on PyTorch's usual -100
            x, targets = norm(x).reshape(B * T, -1), targets.reshape(B * T).clamp_min(-1)
            w = loss_weights.reshape(B * T) if loss_weights is not None else None
            out = self._loss(x, targets, loss_reduction, w)
            if w is not None:
                out = (out[0], out[1].view(B, T))
            elif loss_reduction == "none":
                out = out.view(B, T)
        if return_entropy:
            return out, torch.stack(entropies).float()
        return out

    def _loss(self, x, targets, reduction, weights):
        """The loss of the final-normed x (N, C) against targets (N,): the mean, or the per-row loss (N,), or with
        `weights` (sum of weights·loss, per-row loss detached).

        Never more than one chunk of logits at a time (LOSS_CHUNK_ELEMENTS[device] // V rows: 4,096 rows at
        V = 65,536 on a GPU), whatever the path: all B·T·V logits of a base validation batch at depth 8
        (128 x 2,048 x 65,536) are one 64 GiB tensor, and with the softmax's temporaries they ran an 80 GB GPU
        out of memory. The paths:
        - gradient, softcap in (0, 80], the mean or a weighted sum: FusedLinearSoftcapCE (the backward is a
          scalar's: the lm_head's gradient is made in forward);
        - gradient, per-row loss (GRPO's later passes and its β > 0 passes): SoftcapCrossEntropy when all rows
          fit one chunk (it keeps one chunk's worth of gradient for backward, and needs no second matmul: the
          CPU benchmark's shapes), LinearSoftcapCE (chunked, logits made again in backward) beyond; and any
          loss with the softcap outside (0, 80];
        - no gradient (validation, RL's reference and old log-probs, scoring): chunk by chunk, nothing kept."""
        W, cap = self.lm_head.weight, self.softcap
        N, V = x.size(0), W.size(0)
        chunk = _loss_chunk_rows(x.device.type, V)
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or W.requires_grad)
        if wants_grad and 0 < cap <= 80 and (weights is not None or reduction == "mean"):
            out, per_row = FusedLinearSoftcapCE.apply(x, W, targets, cap, weights)
            return (out, per_row.detach()) if weights is not None else out
        if wants_grad and 0 < cap <= 80 and chunk >= N:  # all rows in one chunk
            per_row = SoftcapCrossEntropy.apply(self.lm_head(x), targets, cap)
        elif wants_grad:
            per_row = LinearSoftcapCE.apply(x, W, targets, cap)
        else:
            per_row = torch.empty(N, device=x.device, dtype=torch.float32)
            for i in range(0, N, chunk):
                per_row[i : i + chunk] = _softcap_nll_(
                    self.lm_head(x[i : i + chunk]).float(), targets[i : i + chunk], cap
                )
        if weights is not None:
            return (per_row * weights).sum(), per_row.detach()
        if reduction == "none":
            return per_row
        return per_row.sum() / (targets >= 0).sum().clamp_min(1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-capped float32 logits of the final-normed x, row-major (B, T, V)."""
        if not _cpu_inference(x):
            out = self.lm_head(x).float()
            if self.softcap > 0 and out.requires_grad:
                return torch.tanh(out / self.softcap) * self.softcap
        else:
            # a few rows' product comes back as a transposed view (InferenceLinear): the first pass below writes
            # it row-major, because every reduction over the vocabulary (the sampler's max and cumsum) runs 4-40x
            # slower across a strided dim (16 x 8192: amax 9 -> 396 us); the transposing write costs ~nothing
            # extra in an elementwise pass (62 us vs 133 for a separate .contiguous())
            out = self._lm_head_infer(x, self.lm_head.weight)
        if self.softcap <= 0:
            return out.float().contiguous()
        # no gradient: cap·tanh(z/cap) as 2cap·sigmoid(2z/cap) - cap, whose sigmoid pass costs a quarter of a tanh
        # pass on the CPU (0.25 vs 0.91 ms a 64-row decode step), in place after the first pass
        cap = self.softcap
        if out.is_contiguous() and out.dtype == torch.float32:  # the matmul's own output: in place
            s = out.mul_(2.0 / cap)
        else:
            s = torch.mul(out, 2.0 / cap, out=torch.empty(out.shape, dtype=torch.float32, device=out.device))
        return s.sigmoid_().mul_(2.0 * cap).sub_(cap)

    def inference_weights(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Per block (W_qkv, W_attn_out, W_fc, W_mlp_out), detached, W_qkv the cached concatenation that the
        no-gradient CPU passes use (InferenceLinear): the compiled decode step's weights."""
        out = []
        for block in self.blocks:
            a, m = block.attn, block.mlp
            w_qkv = a._qkv_infer.weight(a.c_q.weight, a.c_k.weight, a.c_v.weight)
            out.append((w_qkv.detach(), a.c_proj.weight.detach(), m.c_fc.weight.detach(), m.c_proj.weight.detach()))
        return tuple(out)

    @torch.no_grad()
    def attention_maps(self, idx) -> torch.Tensor:
        """The attention probabilities of every layer for a (small) probe batch: (n_layer, B, n_head, T, T).
        Materialises T×T per head (the eager path) whatever the configured backend."""
        B, T = idx.shape
        cos, sin = self._rotary(0, T)
        x = norm(self.wte(idx))
        maps = []
        for block in self.blocks:
            a = block.attn
            h = norm(x)
            q = rope_norm(a.c_q(h).view(B, T, a.n_head, a.head_dim), cos, sin).transpose(1, 2)
            k = rope_norm(a.c_k(h).view(B, T, a.n_kv_head, a.head_dim), cos, sin).transpose(1, 2)
            v = a.c_v(h).view(B, T, a.n_kv_head, a.head_dim).transpose(1, 2)
            y, probs = eager_attention(q, k, v, causal=True, return_probs=True)
            maps.append(probs)
            x = x + a.c_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(norm(x))
        return torch.stack(maps)
