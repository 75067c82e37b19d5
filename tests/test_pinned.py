"""Behaviour a mutation run found unpinned (85 hand-made bugs; these 33 the rest of the suite let pass).

Each test names, in a comment, the kind of bug it catches: a clip bound, a missing detach, rank sharding of the
prompt stream, rotary frequencies, atomic checkpoint writes, RNG restore on resume, Muon's momentum and scale,
AdamW's groups, the pre-clip gradient norm, the majority-baseline test, the loader's shuffles and resumes. One of
them (resuming exactly at an epoch's end) found a real bug: the loader skipped the next epoch.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from testkit import SMALL as STAGES_SMALL
from testkit import tiny_model, trained_one_step

from nanorl.config import resolve


# ---------------------------------------------------------------- rl.py
def test_grpo_clip_binds_on_both_sides_and_stops_the_gradient():  # rl05 (and the clip in general)
    from nanorl.stages.rl import grpo_loss

    # rho = e^0.5 = 1.6487, e^-0.7 = 0.4966, e^0.1 = 1.1052; eps = 0.2
    d = torch.tensor([[0.5, -0.7, 0.1], [0.5, -0.7, 0.1]], dtype=torch.float64)
    logp = d.clone().requires_grad_()
    old = torch.zeros_like(d)
    A = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones_like(d)
    loss, stats = grpo_loss(logp, old, A, mask, 0.2)
    r = [math.exp(x) for x in (0.5, -0.7, 0.1)]
    # A = +1: -min(rho, clip(rho)):  -1.2 (clipped above), -r1, -r2
    # A = -1: -min(-rho, -clip(rho)): r0, 0.8 (clipped below), r2
    expected = (-1.2 - r[1] - r[2] + r[0] + 0.8 + r[2]) / 6
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    g = logp.grad * 6  # d/dlogp of the per-token term: -A*rho when unclipped, 0 when the clip binds
    assert g.flatten().tolist() == pytest.approx([0.0, -r[1], -r[2], r[0], 0.0, r[2]], abs=1e-12)
    assert stats["clipped"].item() == 4  # |rho - 1| > eps: tokens 0 and 1 of both rows


def test_slow_path_gradient_equals_the_fast_path():  # rl08
    # beta > 0 takes the plain-autograd path; with the reference equal to the policy the KL term and its gradient
    # vanish, so the gradient must be the fast path's policy gradient
    from nanorl.stages.rl import policy_gradient

    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 3)]
    comps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 2, 6, 3)]
    A = torch.tensor([1.2, -0.4, -0.8, 0.5], dtype=torch.float64)
    mask = torch.zeros(4, 6, dtype=torch.float64)
    for r, c in enumerate(comps):
        mask[r, : len(c)] = 1.0
    N = float(mask.sum())
    cpu = torch.device("cpu")
    policy_gradient(model, prompts, comps, A, mask, N, cpu, torch.float64, 0.2)
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    policy_gradient(model, prompts, comps, A, mask, N, cpu, torch.float64, 0.2, beta=0.5, reference=lambda: model)
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0
    for a, p in zip(fast, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-7)


def test_prompt_stream_is_partitioned_over_ranks_and_steps():  # rl18
    from nanorl.stages.rl import prompts_for_step

    ex = list(range(50))
    two = [x for s in range(3) for r in range(2) for x in prompts_for_step(ex, s, 4, 1, r, 2)]
    one = [x for s in range(3) for x in prompts_for_step(ex, s, 8, 1, 0, 1)]
    assert two == one and len(set(two)) == 24  # ranks x steps read consecutive, disjoint stretches of one stream


def test_zero_variance_is_exact():  # rl03
    from nanorl.stages.rl import zero_variance

    r = torch.tensor([[0.5] * 7 + [0.5 + 1e-3], [0.1] * 8])
    assert zero_variance(r).tolist() == [False, True]


# ---------------------------------------------------------------- rl stage (pipeline)
# the shared small pipeline with the tiny preset's KL and eval mode, one RL step fewer, no validation, no
# checkpoints inside RL, one eval question
SMALL = [
    *STAGES_SMALL,
    "base.eval_every=0",
    "rl.steps=2",
    "rl.checkpoint_every=0",
    "rl.kl_every=10",
    "eval.max_examples=1",
    "eval.mode=generative",
]


def _cfg(name, *extra):
    return resolve(preset="tiny", overrides=[*SMALL, f"name={name}", *extra])


def _rl_logs(name):
    from nanorl.config import run_dir
    from nanorl.telemetry import read_metrics

    return [r["metrics"] for r in read_metrics(run_dir(name)) if r["stage"] == "rl" and r.get("kind") is None]


@pytest.mark.slow
def test_rl_update_epochs_masks_and_metrics(monkeypatch):  # rl15, rl21, rl22
    from nanorl.plugins import get_plugins
    from nanorl.stages import rl
    from nanorl.stages.runner import run_pipeline

    P, seed = 2, 42
    train = get_plugins().task("arith").load("train")
    first = {rl.prompts_for_step(train, b, P, seed, 0, 1)[0].id for b in range(2)}
    calls = []

    def reward(example, completion, answer):  # each step: prompt 0's group has signal, prompt 1's has none
        calls.append(1)
        return float(len(calls) % 2) if example.id in first else 1.0

    monkeypatch.setattr(rl, "resolve_rewards", lambda cfg, task: [(reward, 1.0)])
    seen = []
    orig = rl.policy_gradient

    def spy(model, prompts, comps, adv, mask, n_tokens, *a, **k):
        old_logp = a[4] if len(a) > 4 else k.get("old_logp")
        loss, st, logp = orig(model, prompts, comps, adv, mask, n_tokens, *a, **k)
        seen.append(
            dict(
                rows=len(comps),
                mask=mask.clone(),
                n=n_tokens,
                old=old_logp,
                logp=logp,
                kl=float(st.get("kl", 0.0)),
                clipped=float(st["clipped"]),
            )
        )
        return loss, st, logp

    monkeypatch.setattr(rl, "policy_gradient", spy)
    from nanorl.telemetry import Telemetry

    started, stage_start = {}, Telemetry.stage_start

    def record(self, info, record=True):
        started[info.stage] = info.answer_counts
        return stage_start(self, info, record)

    monkeypatch.setattr(Telemetry, "stage_start", record)
    flags = (
        "rl.drop_zero_variance=true",
        "rl.mask_truncated=false",
        "rl.dynamic_sampling=false",
        "rl.ppo_epochs=3",
        "rl.kl_every=1",
        "rl.lr=20",
        f"seed={seed}",
    )
    run_pipeline(_cfg("epochs", *flags))
    logs = _rl_logs("epochs")
    assert len(seen) == 6  # 2 steps x 3 epochs x one chunk
    for step in range(2):
        e0, e1, e2 = seen[3 * step : 3 * step + 3]
        # only the signal group is updated: its G rows, all of its tokens (mask_truncated off)
        assert e0["rows"] == 2 and bool((e0["mask"].sum(1) > 0).all())
        assert e0["old"] is None
        # every later epoch compares with the policy that sampled (epoch 0's log-probs), not the previous epoch's
        assert torch.equal(e1["old"], e0["logp"]) and torch.equal(e2["old"], e0["logp"])
        # kl: the policy that sampled (the first epoch: with beta = 0 the only one that scores the reference);
        # clip_frac: over the epochs after the first (rho = 1 in the first, nothing to clip)
        assert e0["clipped"] == 0 and e1["kl"] == e2["kl"] == 0
        assert logs[step]["kl"] == pytest.approx(e0["kl"] / e0["n"])
        assert logs[step]["clip_frac"] == pytest.approx((e1["clipped"] + e2["clipped"]) / (e0["n"] * 2))
    # step 1 starts at the reference; step 2's policy has moved, and its later epochs clip
    assert logs[0]["kl"] == 0 and logs[1]["kl"] > 0 and logs[1]["clip_frac"] > 0
    # the hooks learn the train split's gold answers at the stage's start (the letter-collapse alarm's baseline)
    from collections import Counter

    from nanorl.plugins import get_plugins

    golds = Counter(ex.answer for ex in get_plugins().task("arith").load("train"))
    assert started["rl"] == dict(golds) and len(golds) == 5


@pytest.mark.slow
def test_dynamic_sampling_never_keeps_more_than_prompts_per_step(monkeypatch):  # rl16
    from nanorl.plugins import get_plugins
    from nanorl.stages import rl
    from nanorl.stages.runner import run_pipeline

    P, seed = 2, 42
    train = get_plugins().task("arith").load("train")
    b0, b1 = (rl.prompts_for_step(train, b, P, seed, 0, 1) for b in range(2))
    signal = {b0[0].id, b1[0].id, b1[1].id}  # batch 0: one group with signal (room 1 left); batch 1: two
    assert len(signal) == 3 and b0[1].id not in signal
    calls = []

    def reward(example, completion, answer):
        calls.append(1)
        return float(len(calls) % 2) if example.id in signal else 1.0

    monkeypatch.setattr(rl, "resolve_rewards", lambda cfg, task: [(reward, 1.0)])
    flags = (
        "rl.dynamic_sampling=true",
        "rl.max_sample_batches=4",
        "rl.mask_truncated=false",
        "rl.kl_every=0",
        "rl.steps=1",
        f"seed={seed}",
    )
    run_pipeline(_cfg("dyn-room", *flags))
    log = _rl_logs("dyn-room")[0]
    assert (log["sample_batches"], log["signal_groups"]) == (2, 2)


# ---------------------------------------------------------------- engine
def test_tool_gets_the_code_between_the_markers_only():  # en05
    import nanorl.engine as engine_mod
    from nanorl.engine import Engine
    from tests.test_engine import PROMPTS, SPECIALS, ByteTok, _model

    class NamedSpecials(ByteTok):  # decodes specials as their names, as the real tokenizer does
        def decode(self, ids):
            return "".join(SPECIALS[i - 256] if i >= 256 else chr(i) for i in ids)

    tok = NamedSpecials()
    ps, pe = tok.special_id("<|python_start|>"), tok.special_id("<|python_end|>")
    script = [ps, ord("2"), ord("+"), ord("3"), pe]
    calls = []
    eng = Engine(_model(), tok, tools={"python": lambda code: calls.append(code) or "5"})
    orig = engine_mod.sample_next
    step = [0]

    def scripted(logits, temperature, top_k, gen):
        out = orig(logits, temperature, top_k, gen)
        t = step[0]
        step[0] += 1
        return torch.full_like(out, script[t]) if t < len(script) else out

    engine_mod.sample_next = scripted
    try:
        eng.sample([PROMPTS[0]], num_samples=1, max_new_tokens=8, temperature=1.0)
    finally:
        engine_mod.sample_next = orig
    assert calls == ["2+3"]


# ---------------------------------------------------------------- model
def test_rotary_tables_closed_form():  # md04
    from nanorl.model.gpt import rotary_tables

    cos, sin = rotary_tables(5, 8)
    inv = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)  # 10000^(-2i/8)
    ang = torch.arange(5, dtype=torch.float64)[:, None] * inv
    torch.testing.assert_close(cos.double(), ang.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=1e-6, rtol=0)


def test_fused_mean_loss_gradient_matches_plain_autograd():  # md07
    m = tiny_model(depth=1, width=32, heads=1, noise=0.05, dtype=torch.float32)
    x = torch.randint(0, 300, (2, 12))
    y = torch.randint(0, 300, (2, 12))
    y[0, :5] = -1
    m(x, y).backward()  # fused mean over the 19 counted positions
    fused = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits = m(x)  # soft-capped logits through plain autograd
    torch.nn.functional.cross_entropy(logits.view(-1, 300), y.view(-1), ignore_index=-1).backward()
    for a, p in zip(fused, m.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_a_padding_query_attends_to_itself_only():  # md09
    from nanorl.model.attention import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    key_mask = torch.tensor([[False, False, True, True]])  # two left-pad positions
    out = attention(q, k, v, causal=True, key_mask=key_mask)
    torch.testing.assert_close(out[0, 0, :2], v[0, 0, :2])  # own position only: its own value


# ---------------------------------------------------------------- checkpoint
def test_a_crash_while_writing_tensors_keeps_the_previous_checkpoint(tmp_path, monkeypatch):  # ck01
    import safetensors.torch as st

    from nanorl import checkpoint as ckpt

    model, opt = trained_one_step()[1:3]
    d = ckpt.save(tmp_path / "ck", model, opt, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = st.save_file

    def torn(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 64)  # the process dies halfway through the write
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", torn)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(d, model, opt, {"step": 2})
    monkeypatch.setattr(st, "save_file", real)
    state = ckpt.load(d, model, opt)
    assert state["step"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_crash_while_writing_state_json_leaves_a_readable_one(tmp_path, monkeypatch):  # ck02
    from pathlib import Path

    from nanorl import checkpoint as ckpt

    model, opt = trained_one_step()[1:3]
    d = ckpt.save(tmp_path / "ck", model, opt, {"step": 1})
    real = Path.write_text

    def torn(self, data, *a, **k):
        real(self, data[: len(data) // 2], *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(d, model, opt, {"step": 2})
    monkeypatch.setattr(Path, "write_text", real)
    assert ckpt.read_state(d)["step"] == 1  # the commit record is never torn


def test_rng_round_trip_includes_python_random(tmp_path):  # ck03
    from nanorl import checkpoint as ckpt

    model, _ = trained_one_step()[1:3]
    ckpt.save(tmp_path, model, None, {"step": 0})
    a = random.random()
    random.random()
    ckpt.load(tmp_path, model, restore_rng=True)
    assert random.random() == a


def test_a_final_export_drops_the_optimizer_state(tmp_path):  # ck04
    from nanorl import checkpoint as ckpt

    model, opt = trained_one_step()[1:3]
    d = ckpt.save(tmp_path, model, opt, {"step": 1})
    ckpt.save(d, model, None, {"step": 2})
    assert not (d / ckpt.OPTIM_FILE).exists()
    assert ckpt.OPTIM_FILE not in json.loads((d / ckpt.STATE_FILE).read_text())["files"]


# ---------------------------------------------------------------- supervised loop (common.py)
@pytest.mark.slow
def test_resume_restores_the_rng_and_the_logged_lr_follows_the_schedule(monkeypatch):  # cm01, cm06
    from nanorl.optim import Optimizers, lr_schedule
    from nanorl.stages.common import Interrupted
    from nanorl.stages.runner import run_pipeline

    draws: list[tuple[str, float]] = []
    real = Optimizers.step

    def step(self):
        out = real(self)
        draws.append(float(torch.rand(())))  # a consumer of the global RNG after every step (as dropout would be)
        return out

    monkeypatch.setattr(Optimizers, "step", step)
    extra = ("base.warmup_ratio=0.34", "base.warmdown_ratio=0.5", "base.final_lr_frac=0.1")
    with pytest.raises(Interrupted):  # (stop_after at the last step: tokenizer and base only)
        run_pipeline(_cfg("rng-full", *extra), stop_after={"base": 6})
    full = list(draws)
    with pytest.raises(Interrupted):
        run_pipeline(_cfg("rng-crash", *extra), stop_after={"base": 3})  # checkpoint at step 2
    draws.clear()
    with pytest.raises(Interrupted):
        run_pipeline(_cfg("rng-crash", *extra), stop_after={"base": 6})
    assert draws == full[2:]  # steps 3..6 see the RNG stream they saw uninterrupted
    from nanorl.config import run_dir
    from nanorl.telemetry import read_metrics

    lrs = {
        r["step"]: r["metrics"]["lr"]
        for r in read_metrics(run_dir("rng-full"))
        if r["stage"] == "base" and r.get("kind") is None
    }
    assert [lrs[s] for s in range(1, 7)] == pytest.approx([lr_schedule(s, 6, 0.34, 0.5, 0.1) for s in range(6)])


def test_conversation_loader_targets_masks_and_shards():  # cm03, cm04, cm05
    from nanorl.stages.common import ConversationLoader

    rendered = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1])]
    x, y = next(ConversationLoader(rendered, 1, 4, 0, packed=False, assistant_only=True))
    assert x.tolist() == [[1, 2, 3, 4]] and y.tolist() == [[-1, 3, 4, 5]]  # next token, assistant's only
    x, y = next(ConversationLoader(rendered, 1, 4, 0, packed=False, assistant_only=False))
    assert y.tolist() == [[2, 3, 4, 5]]
    convs = [([100 + i], [1]) for i in range(10)]
    orders = [
        ConversationLoader(convs, 1, 4, 0, packed=False, assistant_only=False, rank=r, world_size=2)._order
        for r in (0, 1)
    ]
    assert not set(orders[0]) & set(orders[1]) and sorted(orders[0] + orders[1]) == list(range(10))


# ---------------------------------------------------------------- optim
def test_adamw_groups_rates_and_weight_decay():  # op04, op05, op10
    from nanorl.model import GPT
    from nanorl.optim import Optimizers

    cfg = resolve(
        overrides=[
            "model.depth=1",
            "model.n_embd=64",
            "model.n_head=1",
            "model.vocab_size=300",
            "optim.weight_decay=0.1",
        ]
    )
    opt = Optimizers(GPT(cfg.model), cfg.optim, lr_mult=0.5)
    s = (64 / 768) ** -0.5  # 3.4641
    assert [g["lr"] for g in opt.adamw.param_groups] == pytest.approx([0.2 * s * 0.5, 0.004 * s * 0.5])
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [0.1, 0.1]
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5)


def test_clip_reports_the_norm_before_clipping():  # op09
    from nanorl.model import GPT
    from nanorl.optim import Optimizers

    cfg = resolve(
        overrides=["model.depth=1", "model.n_embd=32", "model.n_head=1", "model.vocab_size=300", "optim.grad_clip=0.5"]
    )
    torch.manual_seed(0)
    m = GPT(cfg.model)
    m.init_weights()
    opt = Optimizers(m, cfg.optim)
    x = torch.randint(0, 300, (2, 16))
    (m(x, x) * 1000).backward()
    pre = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in m.parameters()))
    assert opt.clip() == pytest.approx(pre, rel=1e-5) and pre > 1.0


# ---------------------------------------------------------------- multichoice
def test_beats_majority_needs_the_interval_above_it():  # mc05
    from nanorl.multichoice import summarize, wilson_interval

    recs = (
        [{"gold": "A", "pred": "A"}] * 4
        + [{"gold": "B", "pred": "B"}] * 3
        + [{"gold": "A", "pred": "C"}] * 2
        + [{"gold": "C", "pred": "D"}]
    )
    m = summarize(recs)  # accuracy 0.7 > majority 0.6 (6 A of 10), but the interval's lower end 0.397 is not
    assert m["accuracy"] == pytest.approx(0.7) and m["majority_baseline"] == pytest.approx(0.6)
    assert wilson_interval(7, 10)[0] < 0.6 and m["beats_majority"] is False


# ---------------------------------------------------------------- data loader
def _tok():
    from nanorl.tokenizer import train_tokenizer
    from tests.test_data import _docs

    return train_tokenizer(_docs(), vocab_size=400)


def test_each_epoch_has_its_own_shuffle():  # dl02
    from nanorl.data import PackedLoader
    from tests.test_data import _docs

    tok = _tok()
    kw = dict(batch_size=4, seq_len=40, seed=5, block_docs=100, prefetch=False)
    first = []
    for epoch in (0, 1, 2):
        loader = PackedLoader(_docs(), tok, **kw)
        loader.load_state_dict({**loader.state_dict(), "epoch": epoch})
        first.append(loader.next_rows().tolist())
    assert first[0] != first[1] and first[1] != first[2]  # a new shuffle of every block each epoch


def test_long_documents_are_cut_without_losing_tokens():  # dl03
    from collections import Counter

    from nanorl.data import PackedLoader

    tok = _tok()
    docs = [" ".join(f"w{(i * j) % 50}" for j in range(200)) for i in range(6)]  # each several rows long
    loader = PackedLoader(docs, tok, batch_size=1, seq_len=40, shuffle=False, block_docs=6)
    rows = []
    while loader.epoch == 0:
        dropped = loader.stats["dropped_tokens"]
        rows.append(loader.next_rows()[0])
    rows.pop()
    expected = Counter(t for ids in tok.encode_batch(docs, bos=True) for t in ids)
    assert max(len(ids) for ids in tok.encode_batch(docs, bos=True)) > 41
    emitted = Counter(int(t) for r in rows for t in r)
    assert sum((expected - emitted).values()) == dropped and not emitted - expected


def test_resume_exactly_at_an_epoch_end():  # dl05
    from nanorl.data import PackedLoader
    from tests.test_data import _docs

    tok = _tok()
    kw = dict(batch_size=1, seq_len=40, seed=5, block_docs=400, prefetch=False)
    probe = PackedLoader(_docs(), tok, **kw)
    n = 0
    while probe.epoch == 0 and (n == 0 or probe.block == 0):
        probe.next_rows()
        n += 1
    loader = PackedLoader(_docs(), tok, **kw)
    for _ in range(n):
        loader.next_rows()
    state = loader.state_dict()
    assert (state["epoch"], state["row"]) == (0, 0) and state["block"] == 1  # at the end of the only block
    expected = loader.next_rows()
    resumed = PackedLoader(_docs(), tok, **kw)
    resumed.load_state_dict(state)
    assert (resumed.next_rows() == expected).all()
