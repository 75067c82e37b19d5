"""The compiled decode step (nanorl.compiled_decode): the same logits as the model, in float64, step after step;
the same samples through the engine; a compiler failure falls back to eager decoding."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from nanorl import compiled_decode
from nanorl.engine import Engine
from nanorl.model import GPT, KVCache
from tests import test_engine
from tests.test_engine import PROMPTS, ByteTok


def _model() -> GPT:
    # two query heads sharing one key/value head: the grouped-query layout, the general case of the graph
    return test_engine._model(torch.float32, "model.n_kv_head=1").eval()


def _prefilled(model: GPT, dtype, G: int) -> KVCache:
    """The engine's layout: ragged prompts left-padded and masked, prefilled once, each shared by G rows."""
    L = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[256] * (L - len(p)) + p for p in PROMPTS])
    cache = KVCache(len(PROMPTS), model.config, L + 8, dtype=dtype)
    cache.key_mask = torch.arange(L + 8)[None, :] >= torch.tensor([L - len(p) for p in PROMPTS])[:, None]
    model(ids, kv_cache=cache, logits="none")
    return cache.share(G)


@torch.no_grad()
def test_compiled_steps_match_the_float64_model():
    model = _model()
    ref = copy.deepcopy(model).double()
    G = 2
    fast, slow = _prefilled(model, torch.float32, G), _prefilled(ref, torch.float64, G)
    decoder = compiled_decode.CompiledDecoder(model)
    toks = torch.randint(0, 256, (7, len(PROMPTS) * G), generator=torch.Generator().manual_seed(1))
    compiled_steps = 0
    for tok in toks:
        want = ref(tok[:, None], kv_cache=slow)[:, -1].double()  # float32 logits from float64 math
        if decoder.usable(fast):
            got = decoder(tok.clone(), fast)  # a fresh tensor, as the engine passes (no storage offset)
            compiled_steps += 1
        else:  # a row's first two own positions decode eagerly (dynamo specialises sizes 0 and 1)
            got = model(tok[:, None], kv_cache=fast)[:, -1]
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
        assert fast.pos == slow.pos
    assert compiled_steps == len(toks) - 2 and decoder.failed is None
    # the keys and values it wrote are the model's
    own = fast.pos - fast.offset
    torch.testing.assert_close(fast.k[:, :, :, :own].double(), slow.k[:, :, :, :own], atol=2e-5, rtol=0)
    torch.testing.assert_close(fast.v[:, :, :, :own].double(), slow.v[:, :, :, :own], atol=2e-5, rtol=0)


def test_compiled_engine_samples_what_the_eager_engine_samples():
    model = _model()
    kw = dict(num_samples=2, max_new_tokens=12, temperature=1.0, seed=5)
    eager = Engine(model, ByteTok()).sample(PROMPTS, **kw)
    engine = Engine(model, ByteTok(), compile=True)
    assert [[s.tokens for s in g] for g in engine.sample(PROMPTS, **kw)] == [[s.tokens for s in g] for g in eager]
    assert engine.decoder.failed is None


def test_a_compiler_failure_falls_back_to_eager_decoding(monkeypatch, caplog):
    def broken():
        def step(*args):
            raise RuntimeError("no C++ compiler found")

        return step

    monkeypatch.setattr(compiled_decode, "_compiled_step", broken)
    model = _model()
    kw = dict(num_samples=2, max_new_tokens=10, temperature=1.0, seed=2)
    engine = Engine(model, ByteTok(), compile=True)
    with caplog.at_level(logging.WARNING):
        got = engine.sample(PROMPTS, **kw)
    assert engine.decoder.failed == "RuntimeError: no C++ compiler found"
    assert "decoding eagerly" in caplog.text
    eager = Engine(model, ByteTok()).sample(PROMPTS, **kw)
    assert [[s.tokens for s in g] for g in got] == [[s.tokens for s in g] for g in eager]


def test_compiled_decoding_is_for_the_cpu():
    with pytest.raises(ValueError, match="runs on the CPU"):
        Engine(_model().to("meta"), ByteTok(), compile=True)
