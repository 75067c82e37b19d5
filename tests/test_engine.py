"""The engine: cached sampling equals uncached sampling, ragged batches equal single prompts, stops, tools."""

from __future__ import annotations

import pytest
import torch

from nanorl.config import resolve
from nanorl.engine import Engine, sample_next

SPECIALS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
            "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")  # fmt: skip


class ByteTok:
    """A stand-in tokenizer: ids 0..255 are bytes, then the special tokens (what the engine needs of one)."""

    vocab_size = 256 + len(SPECIALS)

    def special_id(self, name: str) -> int:
        return 256 + SPECIALS.index(name)

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


def _model(dtype=torch.float64, *overrides: str):
    from nanorl.model import GPT

    shape = ["model.depth=2", "model.n_embd=64", "model.n_head=2", "model.vocab_size=265"]
    cfg = resolve(overrides=[*shape, *overrides]).model
    torch.manual_seed(0)
    m = GPT(cfg)
    m.init_weights()
    with torch.no_grad():  # away from the identity init, so that every layer and position matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.to(dtype)


PROMPTS = [[256, 1, 2, 3, 4, 5, 6, 7, 259], [256, 9, 8, 259], [256, 40, 41, 42, 43, 44, 259]]


def test_cached_sampling_equals_uncached_for_a_seed():
    eng = Engine(_model(), ByteTok(), dtype=torch.float64)
    a = eng.sample(PROMPTS, num_samples=4, max_new_tokens=24, temperature=1.0, top_k=50, seed=3)
    b = eng.sample(PROMPTS, num_samples=4, max_new_tokens=24, temperature=1.0, top_k=50, seed=3, use_cache=False)
    assert [[s.tokens for s in g] for g in a] == [[s.tokens for s in g] for g in b]
    # the seed fixes the samples; another seed gives others; the G samples of a prompt differ
    c = eng.sample(PROMPTS, num_samples=4, max_new_tokens=24, temperature=1.0, top_k=50, seed=4)
    assert [[s.tokens for s in g] for g in a] != [[s.tokens for s in g] for g in c]
    assert len({tuple(s.tokens) for s in a[0]}) > 1


def test_a_ragged_batch_gives_each_prompt_what_it_gets_alone():
    # greedy, so the draw order cannot matter: left padding + key mask must leave every prompt's logits intact
    eng = Engine(_model(), ByteTok(), dtype=torch.float64)
    together = eng.sample(PROMPTS, num_samples=2, max_new_tokens=16, temperature=0.0)
    for p, g in zip(PROMPTS, together, strict=False):
        alone = eng.sample([p], num_samples=1, max_new_tokens=16, temperature=0.0)[0][0]
        assert g[0].tokens == alone.tokens == g[1].tokens


def test_rows_stop_at_assistant_end_independently():
    tok = ByteTok()
    end = tok.special_id("<|assistant_end|>")
    model = _model()
    with torch.no_grad():  # make <|assistant_end|> likely, so that rows stop at different steps
        model.lm_head.weight[end] += 0.5 * model.lm_head.weight.abs().mean()
    eng = Engine(model, tok, dtype=torch.float64)
    groups = eng.sample(PROMPTS, num_samples=8, max_new_tokens=40, temperature=1.0, seed=0)
    rows = [s for g in groups for s in g]
    assert any(s.finished for s in rows)
    stops = {end, tok.special_id("<|bos|>")}  # <|bos|> (a new document) ends a completion too
    for s in rows:
        if s.finished:
            assert s.tokens[-1] in stops and not stops & set(s.tokens[:-1])
        else:
            assert len(s.tokens) == 40 and not stops & set(s.tokens)
    assert len({len(s.tokens) for s in rows if s.finished}) > 1


def test_tool_output_is_force_fed_and_marked():
    tok = ByteTok()
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    os_, oe = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    script = [ps, ord("2"), ord("+"), ord("3"), pe]
    calls = []

    class Scripted(Engine):
        """The model 'writes' a calculator call first, then whatever it samples."""

    eng = Scripted(_model(), tok, tools={"python": lambda code: calls.append(code) or str(eval(code))})
    orig = sample_next

    def scripted(logits, temperature, top_k, gen, _step=[0]):  # noqa: B006 - a step counter
        out = orig(logits, temperature, top_k, gen)
        t = _step[0]
        _step[0] += 1
        return torch.full_like(out, script[t]) if t < len(script) else out

    import nanorl.engine as engine_mod

    engine_mod.sample_next = scripted
    try:
        s = eng.sample([PROMPTS[0]], num_samples=1, max_new_tokens=16, temperature=1.0)[0][0]
    finally:
        engine_mod.sample_next = orig
    assert calls == ["2+3"]
    assert s.tokens[:8] == [*script, os_, ord("5"), oe]
    assert s.forced[:8] == [False] * 5 + [True] * 3 and not any(s.forced[8:])


def test_sample_next_greedy_and_top_k():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(logits, 0.0, 0, None).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, 2, g).item() for _ in range(200)}
    assert draws == {1, 3}


def test_sample_next_follows_the_softmax():
    # 40k rows drawn at once: frequencies within 4 standard errors of softmax(logits / T); a -inf entry never wins
    logits = torch.tensor([[0.0, 1.0, 2.0, -3.0, float("-inf")]]).repeat(40_000, 1)
    for temperature in (1.0, 0.5):
        g = torch.Generator().manual_seed(1)
        freq = torch.bincount(sample_next(logits, temperature, 0, g), minlength=5).double() / logits.size(0)
        p = torch.softmax(logits[0].double() / temperature, -1)
        se = (p * (1 - p) / logits.size(0)).sqrt()
        assert freq[4] == 0
        assert ((freq - p).abs() <= 4 * se + 1e-12).all(), (freq, p)


@pytest.mark.parametrize("G", [1, 3])
def test_prompt_is_prefilled_once_per_batch(G, monkeypatch):
    # the prompt tokens go through the model once per batch, not once per sample
    model = _model()
    seen = []
    orig = model.forward

    def counting(idx, *a, **k):
        seen.append(tuple(idx.shape))
        return orig(idx, *a, **k)

    monkeypatch.setattr(model, "forward", counting)
    Engine(model, ByteTok(), dtype=torch.float64).sample(PROMPTS, num_samples=G, max_new_tokens=3, seed=0)
    assert seen[0] == (3, 9)  # one prefill of the three (left-padded) prompts
    assert all(s == (3 * G, 1) for s in seen[1:])


def _count_weight_casts(model, fn):
    """Run fn() under the profiler and count the copies (aten::_to_copy) of tensors shaped like the model's weight
    matrices, per shape: the bf16 copies autocast makes of the fp32 weights for its matmuls. (The profiler, not a
    dispatch mode: it sees the casts under inference mode too.)"""
    from torch.profiler import ProfilerActivity, profile

    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = fn()
    casts: dict[tuple, int] = {}
    for e in prof.events():
        if e.name == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in shapes:
            key = tuple(e.input_shapes[0])
            casts[key] = casts.get(key, 0) + 1
    return casts, out


def test_sampling_under_autocast_casts_each_weight_once(monkeypatch):
    # Under autocast the fp32 weights are cast to bf16 for every matmul. autocast caches those casts while its
    # outermost context is open, and only for tensors that track gradients (not under inference_mode): one
    # context around the whole generation loop, under no_grad, casts each weight once per call; a context per
    # decode step (or inference mode) would cast every weight again at each of the steps. On the CPU
    # nanorl.device.autocast is a no-op, so CPU bf16 autocast stands in for the GPU's here.
    import nanorl.engine as engine_mod

    monkeypatch.setattr(engine_mod, "autocast", lambda device, dtype: torch.autocast("cpu", dtype=dtype))
    model = _model(torch.float32)
    eng = Engine(model, ByteTok(), dtype=torch.bfloat16)
    steps = 8
    # one sample a prompt (the CPU's shared-prompt decode kernel is not written for CPU autocast), greedy
    casts, groups = _count_weight_casts(model, lambda: eng.sample(PROMPTS, max_new_tokens=steps, temperature=0.0))
    assert casts, "no weight was cast: autocast was not active"
    assert max(len(g[0].tokens) for g in groups) == steps  # a row ran every decode step
    # each weight once for the whole call (the prefill and 7 decode steps): no more casts of a shape than weights
    per_shape: dict[tuple, int] = {}
    for p in model.parameters():
        per_shape[tuple(p.shape)] = per_shape.get(tuple(p.shape), 0) + 1
    assert all(n <= per_shape[shape] for shape, n in casts.items()), (casts, per_shape)
    # the weights are fp32 still, and gradients work again after sampling (no inference tensors left behind)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.train()
    model(torch.tensor([PROMPTS[1]]), torch.tensor([PROMPTS[1][1:] + [0]])).backward()


def test_sample_next_top_k_with_temperature_passes_a_chi_square_test():
    # 30k draws from one logits vector at T = 0.7, top-3: only the 3 largest logits are drawn, with frequencies
    # matching softmax(top-3 logits / 0.7) computed in float64 here (chi-square, 2 degrees of freedom: 18.4 is the
    # 1e-4 critical value; the seed is fixed, so the test is deterministic)
    logits = torch.tensor([[1.0, 2.5, -0.5, 2.0, 0.3, 1.9]])
    n, T = 30_000, 0.7
    g = torch.Generator().manual_seed(7)
    draws = sample_next(logits.repeat(n, 1), T, 3, g)
    counts = torch.bincount(draws, minlength=6).double()
    top = [1, 3, 5]
    assert counts[[0, 2, 4]].sum() == 0
    p = torch.softmax(logits[0, top].double() / T, -1)
    chi2 = ((counts[top] - n * p) ** 2 / (n * p)).sum().item()
    assert chi2 < 18.4, (counts, n * p)
    # and the test has power: the distribution without the temperature is far outside the bound
    p1 = torch.softmax(logits[0, top].double(), -1)
    assert ((counts[top] - n * p1) ** 2 / (n * p1)).sum().item() > 100


def test_the_cache_after_a_forced_tool_span_equals_a_fresh_forward(monkeypatch):
    # Rows write a calculator call at different steps (row r starts at step r), so a tool's output is force-fed
    # to some rows while others sample. The logits of every step, cached, must equal those of a fresh forward of
    # the whole sequence (use_cache=False): the forced tokens went into the KV cache at their positions.
    import nanorl.engine as engine_mod

    tok = ByteTok()
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    script = [ps, ord("7"), ord("*"), ord("6"), pe]
    orig = engine_mod.sample_next

    def run(use_cache: bool):
        seen, step = [], [0]

        def scripted(logits, temperature, top_k, gen):
            seen.append(logits.clone())
            out = orig(logits, temperature, top_k, gen)
            t = step[0]
            step[0] += 1
            for r in range(out.size(0)):
                if 0 <= t - r < len(script):
                    out[r] = script[t - r]
            return out

        monkeypatch.setattr(engine_mod, "sample_next", scripted)
        eng = Engine(_model(), tok, tools={"python": lambda code: str(eval(code))}, dtype=torch.float64)
        groups = eng.sample(PROMPTS[:2], num_samples=2, max_new_tokens=14, temperature=1.0, seed=5,
                            use_cache=use_cache)  # fmt: skip
        return [s for g in groups for s in g], seen

    cached, logits_c = run(True)
    fresh, logits_f = run(False)
    assert [s.tokens for s in cached] == [s.tokens for s in fresh]
    # (the engine sorts prompts longest first: PROMPTS[0] is rows 0-1, PROMPTS[1] rows 2-3)
    out = [tok.special_id(n) for n in ("<|output_start|>", "<|output_end|>")]
    for r, s in enumerate(cached):
        assert s.tokens[r : r + 9] == [*script, out[0], ord("4"), ord("2"), out[1]]
        assert s.forced[r : r + 9] == [False] * 5 + [True] * 4
    assert len(logits_c) == len(logits_f) == 14
    for a, b in zip(logits_c, logits_f, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_low_precision_dtype_on_the_cpu_samples_in_the_weights_dtype():
    # autocast is CUDA's only (nanorl.device.autocast): on a CPU the forward computes in the weights' dtype whatever
    # the run's dtype, so the KV cache must too; a bfloat16 cache beside float32 queries failed in attention
    model = _model(torch.float32)
    for G in (1, 3):  # a plain cache, and a shared prompt prefix
        kw = dict(num_samples=G, max_new_tokens=10, temperature=1.0, seed=2)
        want = Engine(model, ByteTok()).sample(PROMPTS, **kw)
        for dtype in (torch.bfloat16, torch.float16):
            got = Engine(model, ByteTok(), dtype=dtype).sample(PROMPTS, **kw)
            assert [[s.tokens for s in g] for g in got] == [[s.tokens for s in g] for g in want]


def test_a_bf16_decode_step_over_a_shared_prompt_matches_float64():
    # the CPU decode step of a group sharing its ragged prompt (KVCache.share) merges two attention parts by their
    # float32 log-sum-exps; with a bfloat16 model that merge mixed dtypes and failed
    from nanorl.model.attention import shared_prefix_attention

    g = torch.Generator().manual_seed(0)
    P, G, H, Lp, S, D = 2, 3, 2, 5, 4, 16
    q, k, v = (torch.randn(P * G, H, n, D, generator=g, dtype=torch.float64) for n in (1, S, S))
    pk, pv = (torch.randn(P, H, Lp, D, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.arange(Lp)[None, :] >= torch.tensor([[0], [2]])  # the second prompt is left-padded by 2
    want = shared_prefix_attention(q, pk, pv, k, v, mask)
    # the float64 reference written out: softmax over the prompt's real keys and the row's own keys
    keys = torch.cat([pk.repeat_interleave(G, 0), k], 2)
    vals = torch.cat([pv.repeat_interleave(G, 0), v], 2)
    s = (q @ keys.transpose(-2, -1)) / D**0.5
    s[:, :, :, :Lp] = s[:, :, :, :Lp].masked_fill(~mask.repeat_interleave(G, 0)[:, None, None], float("-inf"))
    torch.testing.assert_close(want, s.softmax(-1) @ vals, rtol=1e-10, atol=1e-10)
    got = shared_prefix_attention(*(x.bfloat16() for x in (q, pk, pv, k, v)), mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


def test_a_tiny_temperature_samples_the_greedy_token():
    # logits / T overflowed float32 for T = 1e-40, and the softmax of infinities drew arbitrary tokens
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 5
    g = torch.Generator().manual_seed(0)
    for temperature in (1e-3, 1e-30, 1e-40, 1e-45):
        assert torch.equal(sample_next(logits, temperature, 0, g), logits.argmax(-1)), temperature
        assert torch.equal(sample_next(logits, temperature, 5, g), logits.argmax(-1)), temperature


@pytest.mark.parametrize(
    "prompts, kw, message",
    [
        ([[]], {}, "prompt 0 is empty"),
        ([[256, 1], []], {}, "prompt 1 is empty"),  # in a ragged batch it read a padding token's logits
        ([[256, 1]], {"num_samples": 0}, "num_samples must be >= 1"),
        ([[256, 1]], {"max_new_tokens": -1}, "max_new_tokens >= 0"),
    ],
)
def test_bad_sample_arguments_are_clear_errors(prompts, kw, message):
    with pytest.raises(ValueError, match=message):
        Engine(_model(), ByteTok(), dtype=torch.float64).sample(prompts, **kw)
