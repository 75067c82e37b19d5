"""The GPT: parameter counts, the loss, backend agreement, and KV-cache decoding against full forward passes."""

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nanorl.api import NanorlError
from nanorl.config import resolve
from nanorl.model import GPT, KVCache, count_params
from nanorl.model.gpt import SoftcapCrossEntropy


def small_cfg(**kw):
    """A 2-layer model small enough for quick CPU tests; kw are model.* overrides."""
    base = {"depth": 2, "n_embd": 64, "n_head": 4, "vocab_size": 265, "seq_len": 64}
    base.update(kw)
    return resolve(overrides=[f"model.{k}={v}" for k, v in base.items()]).model


def make_model(cfg, seed=0, scramble=True):
    torch.manual_seed(seed)
    model = GPT(cfg)
    model.init_weights()
    if scramble:
        # the init zeroes the residual outputs (every block starts as the identity): give every weight
        # non-trivial values so attention, MLP and the cache paths all matter to the logits
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.1)
    return model


# ---- counts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "d8", "d12", "d20", "d26"])
def test_param_counts_match_the_module(preset):
    cfg = resolve(preset=preset).model
    with torch.device("meta"):  # no memory: d26 has a billion parameters
        model = GPT(cfg)
    groups = model.param_groups()
    counts = model.num_params()
    assert counts == count_params(cfg)
    assert counts["embedding"] == sum(p.numel() for p in groups["embedding"])
    assert counts["matrices"] == sum(p.numel() for p in groups["matrix"])
    assert counts["unembedding"] == sum(p.numel() for p in groups["unembedding"])
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # every parameter is in exactly one group
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_depth8_with_65k_vocab_has_92m_params():
    cfg = resolve(preset="d8").model
    assert cfg.vocab_size == 65536
    n = count_params(cfg)
    # 2 × 65,536 × 512 embeddings + 8 layers × 12 × 512² matrices
    assert n["total"] == 2 * 65536 * 512 + 8 * 12 * 512**2 == 92_274_688


def test_gqa_shrinks_kv_projections():
    full, gqa = count_params(small_cfg()), count_params(small_cfg(n_kv_head=1))
    # c_k and c_v go from 64×64 to 64×16 in each of the 2 layers
    assert full["matrices"] - gqa["matrices"] == 2 * 2 * 64 * (64 - 16)


def test_flops_per_token_follows_the_benchmark_formula():
    cfg = resolve(overrides=["model.depth=4", "model.n_embd=256", "model.n_head=2", "model.vocab_size=8192"]).model
    n = count_params(cfg)
    assert GPT(small_cfg()).flops_per_token(64) > 0
    from nanorl.model import flops_per_token

    assert flops_per_token(cfg, 256) == 6 * (n["matrices"] + n["unembedding"]) + 12 * 4 * 256 * 256


# ---- init, forward, loss ---------------------------------------------------------------------------------


def test_init_is_deterministic_and_starts_near_uniform():
    cfg = small_cfg()
    a, b = make_model(cfg, seed=3, scramble=False), make_model(cfg, seed=3, scramble=False)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), na
    assert torch.count_nonzero(a.blocks[0].attn.c_proj.weight) == 0
    assert torch.count_nonzero(a.blocks[0].mlp.c_proj.weight) == 0
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    loss = a(idx, idx)
    # a small lm_head gives near-uniform predictions: the loss is ≈ ln(V)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.05


def test_forward_backward_on_cpu():
    cfg = small_cfg()
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    logits = model(idx)
    assert logits.shape == (2, 24, cfg.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() < cfg.softcap  # soft-capped
    loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_loss_matches_float64_reference_with_ignored_targets():
    cfg = small_cfg()
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    targets = torch.randint(0, cfg.vocab_size, (2, 12))
    targets[0, :5] = -1
    logits = model(idx).double()
    ref = torch.nn.functional.cross_entropy(
        logits.view(-1, cfg.vocab_size), targets.view(-1), ignore_index=-1, reduction="none"
    ).view(2, 12)
    per_tok = model(idx, targets, loss_reduction="none")
    assert per_tok.shape == (2, 12)
    torch.testing.assert_close(per_tok.double(), ref, atol=1e-5, rtol=1e-5)
    assert (per_tok[0, :5] == 0).all()
    torch.testing.assert_close(model(idx, targets).double(), ref.sum() / (targets >= 0).sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("softcap", [15, 100])  # the hand-written pass, and the autograd one beyond 80
def test_any_negative_target_is_ignored_on_every_loss_path(softcap):
    """The training loss counted every negative target as ignored, but validation (no gradient) and any loss
    at a softcap beyond 80 went through cross_entropy(ignore_index=-1): PyTorch's usual -100 trained silently
    and then crashed validation with "Target -100 is out of bounds". Every path now gives -100 what -1 gets."""
    cfg = small_cfg(softcap=softcap)
    model = make_model(cfg)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 12)), torch.randint(0, cfg.vocab_size, (2, 12))
    targets[0, :5] = -1
    other = targets.masked_fill(targets < 0, -100)
    for reduction, weighted, grad in LOSS_PATHS:
        want, got = (_loss_run(model, idx, t, reduction, weighted, grad) for t in (targets, other))
        torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
        for name, g in want[1].items():
            torch.testing.assert_close(got[1][name], g, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("reduction_weights", [False, True])
def test_softcap_cross_entropy_gradient_matches_autograd_in_float64(reduction_weights):
    torch.manual_seed(0)
    z = (torch.randn(10, 50) * 20).requires_grad_()  # large logits: the cap matters
    y = torch.randint(0, 50, (10,))
    y[3] = -1
    w = torch.rand(10) if reduction_weights else torch.ones(10)
    (SoftcapCrossEntropy.apply(z, y, 15.0) * w).sum().backward()
    zd = z.detach().double().requires_grad_()
    s = 15.0 * torch.tanh(zd / 15.0)
    ref = torch.nn.functional.cross_entropy(s, y, ignore_index=-1, reduction="none")
    (ref * w.double()).sum().backward()
    torch.testing.assert_close(z.grad.double(), zd.grad, atol=1e-6, rtol=1e-5)


class _LogitRows(TorchDispatchMode):
    """The most rows of any (rows, V) tensor an op allocates (views and in-place results, which allocate
    nothing, left out), forward and backward: the logits, their softmax temporaries and gradients."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows, self.op = vocab, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):  # a view, an in-place or out= op
            return out
        for t in torch.utils._pytree.tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and t.dim()
                and t.size(-1) == self.vocab
                and t.numel() // self.vocab > self.rows
            ):
                self.rows, self.op = t.numel() // self.vocab, f"{func} {tuple(t.shape)}"
        return out


# every way the model computes a loss: (loss_reduction, loss_weights?, gradient?); B x T = 2 x 12 rows
LOSS_PATHS = [
    (r, w, g) for r in ("mean", "none") for w in (False, True) for g in (True, False) if not (w and r == "none")
]


def _incoming(per_pos):
    """A per-position incoming gradient that is not uniform, as GRPO's clipped surrogate's is."""
    return torch.linspace(1.5, 0.5, per_pos.numel(), dtype=per_pos.dtype).view(per_pos.shape)


def _loss_run(model, idx, targets, reduction, weighted, grad):
    """(per-position loss or the loss, the summed/weighted loss, {param: grad}) of one of LOSS_PATHS."""
    model.zero_grad(set_to_none=True)
    w = torch.linspace(-1.0, 2.0, targets.numel()).view(targets.shape) if weighted else None
    with torch.set_grad_enabled(grad):
        out = model(idx, targets, loss_reduction=reduction, loss_weights=w)
        total, value = (out[0], out[1]) if weighted else (out.sum() if reduction == "none" else out, out)
        if grad:
            (total if reduction == "mean" or weighted else (out * _incoming(out)).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


@pytest.mark.parametrize("softcap", [15, 0, 100])  # the hand-written losses' range (0, 80] and either side
@pytest.mark.parametrize("reduction, weighted, grad", LOSS_PATHS)
def test_losses_in_chunks_match_one_chunk_and_float64(monkeypatch, reduction, weighted, grad, softcap):
    """The loss goes through the lm_head LOSS_CHUNK_ELEMENTS logits at a time on every path (base/SFT
    validation under no_grad, RL's reference and old log-probs, GRPO's later passes with gradient, the mean
    training loss): a depth-8 validation batch's logits in one piece were 64 GiB. Chunks of 5 rows (24 rows:
    four chunks and a ragged one) give what one chunk gives, and what float64 gives, values and gradients,
    ignored targets (-1) included."""
    from nanorl.model import counts

    cfg = small_cfg(softcap=softcap)
    model = make_model(cfg)
    torch.manual_seed(1)
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 12)), torch.randint(0, cfg.vocab_size, (2, 12))
    targets[0, :5] = -1
    targets[1, -1] = -1
    one_chunk = _loss_run(model, idx, targets, reduction, weighted, grad)
    monkeypatch.setitem(counts.LOSS_CHUNK_ELEMENTS, "cpu", 5 * cfg.vocab_size)
    chunked = _loss_run(model, idx, targets, reduction, weighted, grad)
    torch.testing.assert_close(chunked[0], one_chunk[0], atol=1e-6, rtol=1e-6)
    assert chunked[1].keys() == one_chunk[1].keys()
    for name, g in one_chunk[1].items():
        # float32 sums over chunks in another order: float32 rounding apart
        torch.testing.assert_close(chunked[1][name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    if reduction == "none" or weighted:
        assert (chunked[0][targets < 0] == 0).all()
    # float64: the same weights, plain autograd over all the logits at once (the lm_head's float64 output: the
    # model hands out float32 logits)
    ref_model = make_model(cfg).double()
    z = []
    ref_model.lm_head.register_forward_hook(lambda _m, _i, out: z.append(out))
    ref_model(idx)
    s = softcap * torch.tanh(z[0] / softcap) if softcap else z[0]
    per_pos = torch.nn.functional.cross_entropy(
        s.view(-1, cfg.vocab_size), targets.view(-1), ignore_index=-1, reduction="none"
    ).view(2, 12)
    if True:
        if weighted:
            w = torch.linspace(-1.0, 2.0, targets.numel(), dtype=torch.float64).view(targets.shape)
            value, total = per_pos, (per_pos * w).sum()
        elif reduction == "none":
            value, total = per_pos, (per_pos * _incoming(per_pos)).sum()
        else:
            value = total = per_pos.sum() / (targets >= 0).sum()
        if grad:
            total.backward()
    torch.testing.assert_close(chunked[0].double(), value.detach(), atol=1e-5, rtol=1e-5)
    for name, p in ref_model.named_parameters():
        if grad:
            torch.testing.assert_close(chunked[1][name].double(), p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("reduction, weighted, grad", LOSS_PATHS)
def test_loss_chunk_bounds_the_largest_logits_tensor(monkeypatch, reduction, weighted, grad):
    """No op, forward or backward, allocates logits (or their softmax, or their gradient) for more rows than a
    chunk holds. V = 384 so that no other activation of this model is V wide."""
    from nanorl.model import counts

    cfg = small_cfg(vocab_size=384)
    model = make_model(cfg)
    idx, targets = torch.randint(0, 384, (2, 12)), torch.randint(0, 384, (2, 12))
    targets[0, :5] = -1
    monkeypatch.setitem(counts.LOSS_CHUNK_ELEMENTS, "cpu", 5 * 384)
    with _LogitRows(384) as seen:
        _loss_run(model, idx, targets, reduction, weighted, grad)
    assert 0 < seen.rows <= 5, seen.op
    with _LogitRows(384) as seen, torch.inference_mode():  # the engine's scoring runs in inference mode
        model(idx, targets, loss_reduction=reduction)
    assert 0 < seen.rows <= 5, seen.op


class _LiveLogitBytes(TorchDispatchMode):
    """The peak bytes of (rows, V) tensors alive at once, as ops allocate them (each storage counted while the
    tensor that an op made for it lives): what a loss chunk costs the allocator at its worst moment."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.peak, self.live = vocab, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        fresh = all(r.alias_info is None for r in func._schema.returns)  # not a view (of the weight, say)
        for t in torch.utils._pytree.tree_leaves(out) if fresh else ():
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.size(-1) == self.vocab:
                self.live[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), weakref.ref(t))
        self.live = {p: (n, ref) for p, (n, ref) in self.live.items() if ref() is not None}
        self.peak = max(self.peak, sum(n for n, _ in self.live.values()))
        return out


@pytest.mark.parametrize("reduction, weighted", [("mean", False), ("mean", True), ("none", False)])
def test_loss_chunk_peak_memory_is_what_the_estimate_budgets(monkeypatch, reduction, weighted):
    """train_memory budgets a loss chunk at its float32 logits and their float32 gradient (8 bytes a logit in
    float32; the matmul-dtype copy of the gradient under autocast on top). The chunk's loss-and-gradient pass
    used to hold three float32 chunk tensors at once (the sigmoid, the softmax numerator and a fresh gradient:
    12 bytes a logit, 1 GiB beyond the estimate at a GPU's 256M-logit chunk)."""
    from nanorl.model import counts

    cfg = small_cfg(vocab_size=384)
    model = make_model(cfg)
    idx, targets = torch.randint(0, 384, (2, 12)), torch.randint(0, 384, (2, 12))
    monkeypatch.setitem(counts.LOSS_CHUNK_ELEMENTS, "cpu", 6 * 384)
    with _LiveLogitBytes(384) as seen:
        _loss_run(model, idx, targets, reduction, weighted, grad=True)
    assert 0 < seen.peak <= 6 * 384 * 8


def test_validation_loss_at_depth_8_stays_within_the_loss_chunk():
    """The reviewer's case, on the meta device (no memory): base validation at depth 8 on an 80 GB GPU,
    128 rows x 2,048 tokens x 65,536 vocab under no_grad, and GRPO's per-position log-probs with gradient (64
    completion rows of 256 tokens): no logits tensor beyond the GPU's chunk (256M float32 logits, 1 GiB)."""
    from nanorl.model import counts

    cfg = resolve(overrides=["model.depth=8", "model.attention=eager"]).model
    with torch.device("meta"):
        model = GPT(cfg)
    V = cfg.vocab_size
    rows = counts.LOSS_CHUNK_ELEMENTS["cuda"] // V
    x = torch.zeros(128, 2048, dtype=torch.long, device="meta")
    with torch.no_grad(), _LogitRows(V) as seen:
        model(x, x, loss_reduction="none")
    assert seen.rows == rows, seen.op
    x = torch.zeros(64, 256, dtype=torch.long, device="meta")
    with _LogitRows(V) as seen:
        model(x, x, loss_reduction="none").sum().backward()
    assert seen.rows == rows, seen.op


def test_loss_chunks_copy_nothing_from_the_host(monkeypatch):
    """The loss's chunk loop runs every 4,096 rows on a GPU: a constant made there with torch.tensor(value,
    device=...) is a blocking host-to-device copy each time. Traced on the meta device: no tensor made from host
    data for the device, no op mixing host and device tensors."""
    real_tensor, made = torch.tensor, []

    def tensor(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            made.append(args)
        return real_tensor(*args, **kwargs)

    class Mixed(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            if len({t.device.type for t in leaves if isinstance(t, torch.Tensor)}) > 1:
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch, "tensor", tensor)
    cfg = small_cfg(attention="eager")
    with torch.device("meta"):
        model = GPT(cfg)
    idx = torch.zeros(2, 12, dtype=torch.long, device="meta")
    from nanorl.model.gpt import _softcap_loss_and_grad_

    with Mixed() as mixed:
        z = torch.zeros(6, 256, device="meta")
        _softcap_loss_and_grad_(z, idx.view(-1)[:6], 15.0, torch.ones(6, device="meta"))
        model(idx, idx).backward()  # the fused mean loss
        model(idx, idx, loss_reduction="none").sum().backward()  # per position, with gradient
        with torch.no_grad():
            model(idx, idx, loss_reduction="none")
    assert not made and not mixed.ops, (made, mixed.ops)


def test_softcap_is_cap_tanh_of_the_raw_logits():
    idx = torch.randint(0, 256, (1, 8))
    outs = []
    with torch.no_grad():
        for cap in (0, 15):
            model = make_model(small_cfg(softcap=cap), seed=5)
            model.lm_head.weight.mul_(10)  # logits well beyond the cap
            outs.append(model(idx))
    raw, capped = outs
    assert raw.abs().max() > 15  # the scrambled weights give logits beyond the cap
    torch.testing.assert_close(capped, 15 * torch.tanh(raw / 15))


# ---- backends --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_sdpa_and_eager_backends_agree(n_kv_head):
    cfg = small_cfg(n_kv_head=n_kv_head)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    grads, outs, ents = [], [], []
    for backend in ("sdpa", "eager"):
        cfg.attention = backend
        model = make_model(cfg)
        logits, ent = model(idx, return_entropy=True)
        model(idx, idx).backward()
        outs.append(logits)
        ents.append(ent)
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert ents[0].shape == (cfg.depth, 2, cfg.n_head, 20)
    torch.testing.assert_close(ents[0], ents[1], atol=1e-5, rtol=1e-5)
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "H, H_kv, Tq, Tk, D",
    [(2, 2, 1, 1, 64), (4, 2, 17, 17, 64), (4, 1, 5, 23, 128), (2, 2, 1, 9, 128)],  # Tq < Tk: against a KV cache
)
def test_attention_backends_match_float64_reference(backend, H, H_kv, Tq, Tk, D):
    """Each backend in float64 against the plain float64 formula (bottom-right causal mask), values and
    gradients: one token, odd lengths, head dims 64 and 128, grouped-query attention. The eager backend is the
    readable reference the others are checked against; it used to take q·kᵀ and the softmax in float32
    whatever the input, so a float64 model on it was float32-accurate (errors ~1e-6, not ~1e-15)."""
    from nanorl.model.attention import attention

    g = torch.Generator().manual_seed(Tq + D)
    q = torch.randn(2, H, Tq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, H_kv, Tk, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, causal=True, backend=backend)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = [out, *torch.autograd.grad(out, (q, k, v), do)]
    kr, vr = (x.repeat_interleave(H // H_kv, 1) for x in (k, v))
    s = (q @ kr.transpose(-1, -2)) / math.sqrt(D)
    visible = torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    ref = s.masked_fill(~visible, float("-inf")).softmax(-1) @ vr
    want = [ref, *torch.autograd.grad(ref, (q, k, v), do)]
    assert out.dtype == torch.float64
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_attention_maps_are_causal_distributions():
    cfg = small_cfg()
    model = make_model(cfg)
    maps = model.attention_maps(torch.randint(0, cfg.vocab_size, (1, 10)))
    assert maps.shape == (cfg.depth, 1, cfg.n_head, 10, 10)
    torch.testing.assert_close(maps.sum(-1), torch.ones(cfg.depth, 1, cfg.n_head, 10))
    assert (maps.triu(1) == 0).all()


def test_triton_backend_on_cpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = small_cfg(attention="triton")
    model = make_model(cfg)
    with pytest.raises(NanorlError, match="needs a CUDA device"):
        model(torch.zeros(1, 4, dtype=torch.long))


# ---- KV cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_kv_cache_decoding_matches_full_forward(n_kv_head):
    cfg = small_cfg(n_kv_head=n_kv_head)
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(2, cfg, max_len=32)
        pieces = [model(idx[:, :9], kv_cache=cache)]  # prefill
        pieces.append(model(idx[:, 9:12], kv_cache=cache))  # several new tokens against a cache
        for t in range(12, 16):  # one token at a time
            pieces.append(model(idx[:, t : t + 1], kv_cache=cache))
    assert cache.pos == 16
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_share_serves_a_group_from_one_prefill():
    cfg = small_cfg(n_kv_head=2)
    model = make_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (1, 7))
    conts = torch.randint(0, cfg.vocab_size, (3, 4))  # three different continuations
    with torch.no_grad():
        cache = KVCache(1, cfg, max_len=16)
        model(prompt, kv_cache=cache)
        cache.share(3)
        assert cache.batch_size == 3 and cache.pos == 7
        steps = [model(conts[:, t : t + 1], kv_cache=cache) for t in range(4)]
        full = model(torch.cat([prompt.expand(3, 7), conts], 1))
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 7:], atol=1e-5, rtol=1e-5)
    cache.reset()
    assert cache.pos == 0


def test_kv_cache_overflow_is_an_error():
    cfg = small_cfg()
    model = make_model(cfg)
    cache = KVCache(1, cfg, max_len=4)
    with torch.no_grad(), pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_positions_beyond_the_rotary_table_still_work():
    cfg = small_cfg(seq_len=8)  # the table holds 2 × 8 positions
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 24))
    with torch.no_grad():
        out = model(idx)
    assert out.shape == (1, 24, cfg.vocab_size) and torch.isfinite(out).all()


def test_rotary_tables_grown_in_inference_mode_still_train():
    """The engine samples under torch.inference_mode; a sample past the tables' 2·seq_len positions grows them
    there. Grown as inference tensors they broke every later training forward ("Inference tensors cannot be
    saved for backward")."""
    cfg = small_cfg(seq_len=8)  # the table holds 2 × 8 positions
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.inference_mode():
        cache = KVCache(2, cfg, max_len=24)
        model(idx[:, :14], kv_cache=cache)
        for t in range(14, 24):  # decoding past position 16
            model(idx[:, t : t + 1], kv_cache=cache)
    assert model.rope_cos.size(0) >= 24 and not model.rope_cos.is_inference() and not model.rope_sin.is_inference()
    loss = model(idx, idx.roll(-1, 1))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():  # and the grown tables are the tables: the same logits as a fresh model's
        fresh = make_model(cfg)
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(idx), fresh(idx))


# ---- CLI -------------------------------------------------------------------------------------------------


def test_model_info_cli_prints_the_truth(capsys):
    from nanorl.cli import main

    with pytest.raises(SystemExit) as e:
        main(["model", "info", "--depth", "8", "--json"])
    assert e.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["total"] == 92_274_688
    assert out["shape"]["n_embd"] == 512 and out["shape"]["n_head"] == 4
    # the GPU training estimate, by hand: float32 weights and gradients (8 bytes), Muon's momentum (4) and a bf16
    # copy (2) for the 25.2 M matrix entries, AdamW's moments (8) for the embedding, those plus the bf16 copy and
    # the loss's float32 head gradient (8 + 2 + 4) for the head; per row, 2048 tokens x width 512 x (8 layers x
    # 41 + 11) bytes
    mem = out["train_memory"]
    assert mem["weights_and_optimizer_bytes"] == 25_165_824 * 14 + 33_554_432 * 16 + 33_554_432 * 22
    assert mem["per_row_bytes"] == 2048 * 512 * (8 * 41 + 11)
    fixed = mem["weights_and_optimizer_bytes"] + mem["loss_chunk_bytes_max"]
    rows = mem["rows_that_fit"]["80GiB"]
    assert fixed + rows * mem["per_row_bytes"] <= 0.85 * 80 * 2**30 < fixed + (rows + 1) * mem["per_row_bytes"]


@pytest.mark.parametrize(
    "heads, copy", [((4, 2), False), ((2, 2), False), ((4, 2), True)]
)  # grouped-query; as many kv heads (the CPU decode's fused path); rows with copies (the GPU's way)
def test_kv_cache_share_of_ragged_prompts_matches_each_row_alone(heads, copy):
    # two prompts of different lengths (left-padded, masked), three rows each; the rows then take steps of 1
    # and of 2 tokens: every row's logits must be those of its own sequence run alone
    cfg = small_cfg(n_head=heads[0], n_kv_head=heads[1])
    model = make_model(cfg)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (6, 3)]
    conts = torch.randint(0, cfg.vocab_size, (6, 3), generator=g)
    with torch.no_grad():
        cache = KVCache(2, cfg, max_len=12)
        cache.key_mask = torch.tensor([[True] * 9, [False] * 3 + [True] * 6])
        model(torch.stack([prompts[0], torch.cat([prompts[1][:1].repeat(3), prompts[1]])]), kv_cache=cache)
        cache.share(3, copy=copy)  # rows: prompt 0 three times, then prompt 1 three times
        steps = [model(conts[:, :1], kv_cache=cache), model(conts[:, 1:], kv_cache=cache)]
        assert cache.pos == 9
        for r in range(6):
            alone = model(torch.cat([prompts[r // 3], conts[r]])[None])[0, -3:]
            torch.testing.assert_close(torch.cat(steps, 1)[r], alone, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="already shared"):
            cache.share(2)


def test_shared_prefix_attention_entropy_matches_the_eager_reference():
    from nanorl.model.attention import entropy_from_probs, shared_prefix_attention

    torch.manual_seed(0)
    P, G, H, Hkv, T, Lp, S, D = 2, 3, 4, 2, 2, 5, 4, 8
    q = torch.randn(P * G, H, T, D, dtype=torch.float64)
    pk, pv = torch.randn(P, Hkv, Lp, D, dtype=torch.float64), torch.randn(P, Hkv, Lp, D, dtype=torch.float64)
    k, v = torch.randn(P * G, Hkv, S, D, dtype=torch.float64), torch.randn(P * G, Hkv, S, D, dtype=torch.float64)
    out, ent = shared_prefix_attention(q, pk, pv, k, v, return_entropy=True)
    full_k = torch.cat([pk.repeat_interleave(G, 0), k], 2)
    full_v = torch.cat([pv.repeat_interleave(G, 0), v], 2)
    # float64 reference: every row's own copy of its prompt, a bottom-right causal mask
    scores = q @ full_k.repeat_interleave(H // Hkv, 1).transpose(-2, -1) / D**0.5
    allowed = torch.arange(Lp + S)[None, :] <= torch.arange(Lp + S - T, Lp + S)[:, None]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    torch.testing.assert_close(out, probs @ full_v.repeat_interleave(H // Hkv, 1))
    torch.testing.assert_close(ent, entropy_from_probs(probs).float())


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_chunked_entropy_matches_float64_even_for_large_scores(scale):
    """sdpa's entropy (telemetry) was the difference of two large float32 numbers: 1e-4 off at 30x typical
    scores. Relative to the row maximum it stays at float32 rounding, chunk boundaries and GQA included."""
    from nanorl.model.attention import chunked_entropy, entropy_from_probs

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 37, 16) * scale**0.5, torch.randn(2, 2, 37, 16) * scale**0.5
    scores = q.double() @ k.double().repeat_interleave(2, 1).transpose(-2, -1) / 16**0.5
    allowed = torch.ones(37, 37, dtype=torch.bool).tril()
    want = entropy_from_probs(scores.masked_fill(~allowed, float("-inf")).softmax(-1))
    got = chunked_entropy(q, k, causal=True, chunk=8)
    assert (got.double() - want).abs().max() < 1e-5  # (the scores themselves are float32)


def test_hand_written_backwards_pass_gradcheck():
    from nanorl.model.gpt import NORM_EPS, _ReLU2, _RMSNorm, _RopeNorm, rotary_tables

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double()[:5, None, :] for t in rotary_tables(5, 8))
    assert torch.autograd.gradcheck(_RMSNorm.apply, (x,))
    assert torch.autograd.gradcheck(_ReLU2.apply, (x,))
    assert torch.autograd.gradcheck(lambda t: _RopeNorm.apply(t, cos, sin), (x,))
    # and the forward is what it claims: rms_norm of the rotated pairs (x1, x2) -> (x1·c + x2·s, x2·c - x1·s)
    x1, x2 = x[..., :4], x[..., 4:]
    rot = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), -1)
    eps = NORM_EPS  # the model's one epsilon, whatever the dtype (F.rms_norm's default is the dtype's)
    torch.testing.assert_close(_RopeNorm.apply(x, cos, sin), torch.nn.functional.rms_norm(rot, (8,), eps=eps))
    torch.testing.assert_close(_RMSNorm.apply(x), torch.nn.functional.rms_norm(x, (8,), eps=eps))


@pytest.mark.parametrize("grad", [True, False])  # the hand-written autograd nodes, and F.rms_norm without them
def test_norms_of_bf16_inputs_match_float32_at_small_rms(grad):
    """One epsilon for every dtype. The hand-written norms added the dtype's machine epsilon, so the bf16 q and
    k of a GPU run under autocast (_RopeNorm) got 2^-7 added to their mean square: at a pre-norm RMS of 0.1
    (mean square 0.01) they came out ~25% smaller than the float32 CPU's, a different model. bf16 must differ
    from float32 only by bf16 rounding, for QK-norm (rotary + norm), the residual norm, and the compiled decode
    step's norm."""
    from nanorl.compiled_decode import _rms
    from nanorl.model.gpt import norm, rope_norm, rotary_tables

    torch.manual_seed(0)
    x = (torch.randn(2, 5, 3, 64) * 0.1).bfloat16()
    cos, sin = (t[:, None, :] for t in rotary_tables(5, 64))
    with torch.set_grad_enabled(grad):
        for f in (lambda t: rope_norm(t, cos, sin), norm, _rms):
            want = f(x.float().requires_grad_(grad))  # float32, from the same (bf16-representable) values
            got = f(x.clone().requires_grad_(grad))
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
            ratio = (got.float().square().mean() / want.square().mean()).sqrt()
            assert abs(ratio.item() - 1) < 5e-3  # the output's RMS: 0.75 with the bf16 epsilon


def test_fused_loss_under_bf16_autocast_follows_the_fp32_one():
    # the path CUDA training takes (matmuls in bf16, softmax math in fp32), exercised with CPU autocast
    cfg = small_cfg()
    idx, targets = torch.randint(0, cfg.vocab_size, (2, 16)), torch.randint(0, cfg.vocab_size, (2, 16))
    grads, losses = [], []
    for amp in (False, True):
        model = make_model(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(idx, targets)
        loss.backward()
        assert loss.dtype == torch.float32
        losses.append(loss.item())
        grads.append(model.lm_head.weight.grad)
    assert abs(losses[0] - losses[1]) < 0.02 * losses[0]
    assert grads[1].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)
    assert cos > 0.99


@pytest.mark.parametrize("shape", [(1, 1), (2, 12), (3, 100)])
def test_inference_weight_caches_follow_the_weights(shape):
    # no-gradient CPU passes use cached fused/transposed weights, in a layout that depends on the row count
    # (InferenceLinear: one row, a few, a few hundred): after an optimizer step, a load_state_dict or a move to
    # another dtype they must give what the gradient path (which reads the parameters) gives
    from nanorl.optim import Optimizers

    cfg = small_cfg(n_kv_head=2)
    model = make_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, shape)

    def gap() -> float:
        with torch.no_grad():
            cached = model(idx)
        return (cached - model(idx).detach()).abs().max().item()

    assert gap() < 1e-5
    opt = Optimizers(model, resolve().optim)
    model(idx, targets=idx).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert gap() < 1e-5
    model.load_state_dict(make_model(cfg, seed=1).state_dict())
    assert gap() < 1e-5
    model.double()
    assert gap() < 1e-5  # a stale float32 cache would not even multiply with float64 activations


@pytest.mark.parametrize("mixed", [True, False])
def test_training_memory_estimate_covers_what_autograd_keeps(mixed):
    """The activation bytes a token costs (nanorl.model.counts.ACTIVATION_BYTES, behind the GPU batch size a
    stage picks), measured again: the distinct tensors autograd saves for the backward, under bf16 autocast or
    in float32. Per token and layer from the depth x length interaction (what grows with both), outside the
    layers from the length alone. A model change that keeps more for the backward fails here before it makes
    a GPU run run out of memory."""
    from nanorl.model.counts import ACTIVATION_BYTES, saved_bytes

    def saved(depth: int, T: int) -> int:
        cfg = small_cfg(depth=depth, n_embd=256, n_head=2, seq_len=T, vocab_size=512, attention="sdpa")
        torch.manual_seed(0)
        model = GPT(cfg)
        model.init_weights()
        return saved_bytes(model, torch.randint(0, 512, (2, T)), mixed)

    a, b, c, d = saved(1, 32), saved(1, 64), saved(3, 32), saved(3, 64)
    per_layer = ((d - c) - (b - a)) / (2 * 2 * 32 * 256)  # 2 more layers, 2 x 32 more tokens, width 256
    outside = (b - a) / (2 * 32 * 256) - per_layer
    inside_est, outside_est = ACTIVATION_BYTES["mixed" if mixed else "float32"]
    assert 0.9 * inside_est <= per_layer <= inside_est
    assert 0.75 * outside_est <= outside <= outside_est


def test_saved_bytes_autocasts_on_the_inputs_device(monkeypatch):
    """saved_bytes measures under the autocast of the device its input lives on: the CPU's here (where
    ACTIVATION_BYTES were measured), CUDA's for a model on a GPU (tests/test_kernels.py compares the triton and
    sdpa backends there, where the CPU's autocast would leave the forward in float32)."""
    import warnings
    from types import SimpleNamespace

    from nanorl.model.counts import saved_bytes

    seen = []
    autocast = torch.autocast

    def spy(device_type, *args, **kwargs):
        seen.append((device_type, kwargs.get("enabled")))
        return autocast(device_type, *args, **kwargs)

    monkeypatch.setattr(torch, "autocast", spy)
    assert saved_bytes(make_model(small_cfg(attention="sdpa")), torch.randint(0, 265, (2, 16))) > 0
    assert seen[0] == ("cpu", True)

    class Stub:  # what saved_bytes asks of a model, for an input on a CUDA device this machine may not have
        def parameters(self):
            return []

        def __call__(self, x, y):
            pass

    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a GPU torch says CUDA's autocast is off
        saved_bytes(Stub(), SimpleNamespace(device=torch.device("cuda")), mixed=False)
    assert seen == [("cuda", False)]
