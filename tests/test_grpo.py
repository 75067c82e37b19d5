"""GRPO: the loss equals its formula on a hand-computed batch; the shared-prompt forward equals the plain one."""

from __future__ import annotations

import math

import pytest
import torch
from testkit import tiny_model

from nanorl.config import resolve
from nanorl.stages.rl import completion_logprobs, group_advantages, grpo_loss, prompts_for_step


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    adv, zero = group_advantages(r, std_normalize=False)
    assert adv.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
    assert zero.tolist() == [False, True]
    adv, _ = group_advantages(r, std_normalize=True)
    # population std of (1, 0, 0, 1) is 0.5
    a = 0.5 / (0.5 + 1e-4)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a])
    assert adv[1].abs().max().item() == 0.0


def test_grpo_loss_matches_the_formula_by_hand():
    # two rows of three tokens; row 1's last token is masked
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]], dtype=torch.float64)
    old = torch.tensor([[-1.1, -1.5, -0.5], [-0.3, -1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-0.9, -2.0, -0.7], [-0.5, -1.1, -2.0]], dtype=torch.float64)
    A = torch.tensor([1.5, -0.5], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    eps, beta = 0.2, 0.1
    # by hand, token by token
    total, clipped = 0.0, 0
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t] - old[i, t])
            a = A[i].item()
            pg = -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            d = ref[i, t].item() - logp[i, t].item()
            kl = math.exp(d) - d - 1
            total += pg + beta * kl
            clipped += abs(rho - 1) > eps
    expected = total / 5
    loss, stats = grpo_loss(logp, old, A, mask, eps, beta, ref)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["clipped"].item() == clipped
    # n_tokens: chunks of a batch normalise by the whole batch's count and add up to the batch loss
    l0, _ = grpo_loss(logp[:1], old[:1], A[:1], mask[:1], eps, beta, ref[:1], n_tokens=5)
    l1, _ = grpo_loss(logp[1:], old[1:], A[1:], mask[1:], eps, beta, ref[1:], n_tokens=5)
    assert (l0 + l1).item() == pytest.approx(expected, rel=1e-12)


def test_grpo_gradient_is_the_policy_gradient_when_on_policy():
    # ratio = 1 (old = logp detached): d loss / d logp_t = -A_i / N on kept tokens (beta = 0)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], dtype=torch.float64, requires_grad=True)
    A = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.float64)
    loss, _ = grpo_loss(logp, logp.detach(), A, mask, 0.2)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])


def test_shared_prompt_forward_equals_plain_forward_values_and_gradients():
    # (the model's loss runs in float32 whatever the weights' dtype, hence float32-level tolerances)
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (7, 4)]  # ragged: left padding
    G = 3
    comps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 2, 6, 3, 1, 4)]
    lp = completion_logprobs(model, prompts, comps, torch.device("cpu"), torch.float64)
    lp.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    for r, c in enumerate(comps):
        seq = torch.tensor([prompts[r // G] + c])
        logits = model(seq[:, :-1]).double()
        ref = torch.log_softmax(logits, -1)[0, -len(c) :].gather(1, torch.tensor(c)[:, None]).squeeze(1)
        assert lp[r, : len(c)].tolist() == pytest.approx(ref.tolist(), abs=2e-5)
        if len(c) < lp.size(1):
            assert lp[r, len(c) :].abs().max().item() == 0
        total = total + ref.sum()
    total.backward()
    for a, p in zip(grads, model.parameters(), strict=False):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("softcap", [15.0, 0.0])
def test_first_pass_fast_path_gives_the_formula_loss_and_gradient(softcap):
    # policy_gradient's first pass (beta = 0) backpropagates a weighted NLL through the fused loss instead of the
    # GRPO formula: its loss, statistics, log-probs and gradients must be the formula's
    from nanorl.stages.rl import policy_gradient

    model = tiny_model()
    model.softcap = softcap
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (6, 3)]
    comps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 2, 6, 3, 1, 4)]
    A = torch.tensor([1.2, -0.4, -0.8, 0.5, 0.0, -0.5], dtype=torch.float64)
    mask = torch.zeros(6, 6, dtype=torch.float64)
    for r, c in enumerate(comps):
        mask[r, : len(c)] = 1.0
    mask[1] = 0.0  # a truncated completion: masked whole
    N = float(mask.sum())
    cpu = torch.device("cpu")
    loss, stats, logp = policy_gradient(model, prompts, comps, A, mask, N, cpu, torch.float64, 0.2)
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logp = completion_logprobs(model, prompts, comps, cpu, torch.float64)
    ref_loss, _ = grpo_loss(ref_logp, ref_logp.detach(), A, mask, 0.2, n_tokens=N)
    ref_loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9)
    assert stats["clipped"].item() == 0
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=1e-5, atol=1e-5)
    assert sum(p.grad.abs().sum() for p in model.parameters()) > 0
    for a, p in zip(fast, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_prompts_for_step_is_a_pure_function_and_ranks_are_disjoint():
    ex = list(range(50))
    a = prompts_for_step(ex, 3, 4, seed=1, rank=0, world=2)
    b = prompts_for_step(ex, 3, 4, seed=1, rank=1, world=2)
    assert a == prompts_for_step(ex, 3, 4, seed=1, rank=0, world=2)
    assert not set(a) & set(b)


def test_scorer_next_token_logits_ragged_equals_one_by_one():
    from nanorl.stages.rl import ModelScorer

    model = tiny_model()
    scorer = ModelScorer(None, model, lambda: model, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(2)
    contexts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 9, 2)]
    together = scorer.next_token_logits("policy", contexts, [3, 7, 11])
    for c, row in zip(contexts, together, strict=True):
        with torch.no_grad():  # the same (inference) logits path as the scorer's
            alone = model(torch.tensor([c]))[0, -1, [3, 7, 11]].tolist()
        assert row == pytest.approx(alone, abs=1e-9)
    lp = scorer.token_logprobs("reference", contexts[0], [[1, 2], [3]])
    assert [len(x) for x in lp] == [2, 1]


def test_token_masks_forced_dropped_and_truncated():
    from nanorl.engine import Sample
    from nanorl.stages.rl import token_masks

    samples = [
        Sample([5, 6, 7], True, [False, True, False]),  # finished; its middle token came from a tool
        Sample([5, 6], False, [False, False]),  # cut at max_new_tokens
        Sample([8], True, [False]),  # finished, but its group was dropped
    ]
    keep = [True, True, False]
    assert token_masks(samples, keep, mask_truncated=True) == [[1.0, 0.0, 1.0], [0.0, 0.0], [0.0]]
    assert token_masks(samples, keep, mask_truncated=False) == [[1.0, 0.0, 1.0], [1.0, 1.0], [0.0]]


def test_update_skips_masked_prompts_and_keeps_the_gradient():
    # the update runs only on prompts with a token to learn from: the gradient must equal the full batch's, where
    # the masked prompts' rows are computed and contribute zero
    from nanorl.stages.rl import policy_gradient, update_chunks

    model = tiny_model()
    G = 2
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (4, 7, 3, 5)]
    comps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 5, 2, 4, 6, 1, 2, 3)]
    masks = [[1.0] * len(c) for c in comps]
    for r in (2, 3, 6, 7):  # prompts 1 and 3: a dropped group, and a group whose rows were both cut
        masks[r] = [0.0] * len(comps[r])
    masks[4][0] = 0.0  # a tool's token in a kept group
    A = torch.tensor([1.0, -1.0, 0.5, -0.5, -0.7, 0.7, 0.3, -0.3], dtype=torch.float64)
    N = sum(map(sum, masks))
    cpu = torch.device("cpu")

    chunks = update_chunks(masks, G, max_rows=2)
    assert chunks == [[0], [2]]
    assert update_chunks(masks, G, max_rows=64) == [[0, 2]]
    assert update_chunks([[0.0]] * 4, G, max_rows=64) == []

    def grads(prompt_sets):
        model.zero_grad()
        total = 0.0
        for chunk in prompt_sets:
            rows = [i * G + j for i in chunk for j in range(G)]
            C = max(len(comps[r]) for r in rows)
            mask = torch.zeros(len(rows), C, dtype=torch.float64)
            for k, r in enumerate(rows):
                mask[k, : len(masks[r])] = torch.tensor(masks[r], dtype=torch.float64)
            loss, _, _ = policy_gradient(
                model, [prompts[i] for i in chunk], [comps[r] for r in rows], A[rows], mask, N, cpu,
                torch.float64, 0.2,
            )  # fmt: skip
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    loss_skip, g_skip = grads(chunks)
    loss_all, g_all = grads([[0, 1, 2, 3]])
    assert loss_skip == pytest.approx(loss_all, rel=1e-9)
    assert sum(x.abs().sum() for x in g_all) > 0
    for a, b in zip(g_skip, g_all, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_update_rows_fit_the_gpu_with_the_reference_model_set_aside(monkeypatch):
    """The update's rows a pass: 64 on the CPU; on a GPU what the training estimate fits next to the frozen
    reference model (when the run uses it), and a clear error when not even one group fits."""
    from types import SimpleNamespace

    from nanorl.api import NanorlError
    from nanorl.model.counts import count_params, train_memory
    from nanorl.stages.rl import UPDATE_ROWS, update_rows

    gib = 2**30

    def ctx(device: str, gpu_gib: int, *extra: str):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gpu_gib * gib))
        return SimpleNamespace(cfg=resolve(overrides=list(extra)), device=torch.device(device))

    assert update_rows(ctx("cpu", 0, "model.depth=20"), 456) == UPDATE_ROWS == 64
    assert update_rows(ctx("cuda", 80, "model.depth=8"), 456) == 64  # a small model: the cap
    # depth 20 on 40 GiB, AQuA-like rows (a 200-token prompt and 256 new tokens), the KL telemetry on
    c = ctx("cuda", 40, "model.depth=20")
    rows = update_rows(c, 456)
    m = c.cfg.model
    reference = 4 * count_params(m)["total"]
    budget = 0.85 * 40 * gib - reference
    assert 8 <= rows < 64
    assert train_memory(m, rows, 456)["total"] <= budget < train_memory(m, rows + 1, 456)["total"]
    assert update_rows(ctx("cuda", 40, "model.depth=20", "rl.kl_every=0"), 456) > rows  # no reference model
    with pytest.raises(NanorlError, match="group of 8 completions") as err:
        update_rows(ctx("cuda", 24, "model.depth=26"), 456)
    assert "rl.group_size" in err.value.hint


def test_update_rows_is_decided_by_every_rank_together(monkeypatch):
    """The ranks agree on the rows a pass: the longest row over every rank and the fewest rows any GPU fits, so
    that a group too long for the GPU stops every rank, not only the one that sampled it."""
    from types import SimpleNamespace

    from nanorl.api import NanorlError
    from nanorl.stages import rl

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=40 * gib))
    ctx = SimpleNamespace(cfg=resolve(overrides=["model.depth=20"]), device=torch.device("cuda"))
    alone = rl.update_rows(ctx, 300)
    # another rank sampled longer rows (2,048 tokens): this rank's pass is sized for them
    monkeypatch.setattr(rl, "max_over_ranks", lambda *v: [max(v[0], 2048)])
    longer = rl.update_rows(ctx, 300)
    assert longer < alone
    # another rank's GPU fits fewer than a group: every rank raises, this one too
    monkeypatch.setattr(rl, "min_over_ranks", lambda *v: [min(v[0], 4)])
    with pytest.raises(NanorlError, match="group of 8 completions of 2048 tokens"):
        rl.update_rows(ctx, 300)


def test_update_rows_are_built_on_the_host_and_copied_once(monkeypatch):
    # the completions' input and target rows go to the device as one tensor each (pinned and asynchronous on CUDA),
    # not a copy per row
    from nanorl.stages.common import to_device
    from nanorl.stages.rl import completion_logprobs

    model = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    comps = [[6, 7], [8], [9, 10, 11], []]
    writes = []
    orig = torch.Tensor.__setitem__
    monkeypatch.setattr(torch.Tensor, "__setitem__", lambda t, k, v: writes.append(k) or orig(t, k, v))
    with torch.no_grad():
        lp = completion_logprobs(model, prompts, comps, torch.device("cpu"), torch.float64)
    monkeypatch.undo()
    # no write of one row (t[i, ...] = ...); the model's own chunked loss writes whole slices of rows, which is fine
    per_row = [k for k in writes if isinstance(k, int) or (isinstance(k, tuple) and isinstance(k[0], int))]
    assert per_row == [] and lp.shape == (4, 3)
    assert lp[1, 1:].abs().max() == 0 and lp[3].abs().max() == 0  # padding past each completion's end

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append("pin") or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: calls.append((str(a[0]), k)) or t)
    t = to_device([[1, 2], [3, 4]], torch.long, torch.device("cuda", 1))
    assert t.tolist() == [[1, 2], [3, 4]]
    assert calls == ["pin", ("cuda:1", {"non_blocking": True})]


def _grpo_reference(logp, old, ref, A, mask, eps, beta):
    """The module docstring's loss, its gradient d loss / d logp and its statistics, token by token in float64
    Python, with the gradient derived by hand (not by autograd): the unclipped term -rho*A is the min's when
    rho*A <= clip(rho)*A, and then its gradient is -rho*A; otherwise the clipped term is, constant in logp
    (rho is outside the band); the k3 KL's gradient is beta*(1 - exp(ref - logp))."""
    R, C = len(logp), len(logp[0])
    N = sum(map(sum, mask))
    loss, clipped, kl_sum = 0.0, 0, 0.0
    grad = [[0.0] * C for _ in range(R)]
    for i in range(R):
        for t in range(C):
            if not mask[i][t]:
                continue
            rho, a = math.exp(logp[i][t] - old[i][t]), A[i]
            clip = min(max(rho, 1 - eps), 1 + eps)
            unclipped_is_min = rho * a <= clip * a
            loss += -min(rho * a, clip * a)
            g = -rho * a if unclipped_is_min else 0.0
            clipped += abs(rho - 1) > eps
            if ref is not None:
                d = ref[i][t] - logp[i][t]
                kl_sum += math.exp(d) - d - 1
                loss += beta * (math.exp(d) - d - 1)
                g += beta * (1 - math.exp(d))
            grad[i][t] = g / N
    return loss / N, grad, clipped, kl_sum


@pytest.mark.parametrize(("with_ref", "beta"), [(False, 0.0), (True, 0.0), (True, 0.04)])
@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_grpo_loss_gradient_on_both_sides_of_the_clip(eps, with_ref, beta):
    # every case of the clipped surrogate: rho above the band with A > 0 (clipped: no gradient) and A < 0 (the
    # unclipped term is the min: gradient), below it with A > 0 (gradient) and A < 0 (clipped), and inside it;
    # with the reference and beta = 0 the KL is a statistic only (no gradient)
    log_rho = [[0.5, -0.5, 0.05, 0.0], [0.5, -0.5, -0.05, 0.2], [0.0, 0.0, 0.0, 0.0]]
    old = [[-1.0, -2.0, -0.3, -4.0], [-0.7, -1.1, -2.2, -0.9], [-1.5, -0.2, -0.6, -3.0]]
    logp = [[o + d for o, d in zip(ro, rd, strict=True)] for ro, rd in zip(old, log_rho, strict=True)]
    ref = [[-1.2, -1.8, -0.3, -3.0], [-0.6, -1.5, -2.0, -1.4], [-1.0, -0.9, -0.6, -2.5]] if with_ref else None
    A = [1.3, -0.7, 0.0]  # the last row: a zero advantage (it adds only its KL)
    mask = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]  # row 0's last token: a tool's, or past the end
    exp_loss, exp_grad, exp_clipped, exp_kl = _grpo_reference(logp, old, ref, A, mask, eps, beta)

    f64 = dict(dtype=torch.float64)
    lp = torch.tensor(logp, **f64, requires_grad=True)
    ref_t = torch.tensor(ref, **f64) if with_ref else None
    loss, stats = grpo_loss(lp, torch.tensor(old, **f64), torch.tensor(A, **f64), torch.tensor(mask, **f64), eps,
                            beta, ref_t)  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(exp_loss, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(lp.grad, torch.tensor(exp_grad, **f64), rtol=1e-12, atol=1e-15)
    assert stats["clipped"].item() == exp_clipped == (4 if eps == 0.3 else 5)
    if with_ref:
        assert stats["kl"].item() == pytest.approx(exp_kl, rel=1e-12)
    else:
        assert "kl" not in stats


@pytest.mark.parametrize(("beta", "later_pass"), [(0.05, False), (0.0, True), (0.05, True)])
def test_policy_gradient_through_the_model_matches_a_float64_reference(beta, later_pass):
    # the autograd path of policy_gradient (beta > 0, or a later PPO pass whose old log-probs differ from the
    # policy's): its loss, statistics and gradients against the formula on the plain model's float64 log-softmax
    from nanorl.stages.rl import policy_gradient

    model, reference = tiny_model(), tiny_model(noise=0.05)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (5, 3)]
    comps = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (4, 2, 5, 3)]
    G, C = 2, 5
    A = torch.tensor([0.9, -0.9, -1.1, 1.1], dtype=torch.float64)
    mask = torch.zeros(4, C, dtype=torch.float64)
    for r, c in enumerate(comps):
        mask[r, : len(c)] = 1.0
    mask[2, 1] = 0.0  # a tool's token
    N, eps = float(mask.sum()), 0.2

    def plain_logp(m):
        out = torch.zeros(4, C, dtype=torch.float64)
        for r, c in enumerate(comps):
            seq = torch.tensor([prompts[r // G] + c])
            logits = m(seq[:, :-1]).double()
            lp = torch.log_softmax(logits, -1)[0, -len(c) :].gather(1, torch.tensor(c)[:, None]).squeeze(1)
            out = out.index_put((torch.tensor([r]), torch.arange(len(c))), lp)
        return out

    with torch.no_grad():
        ref_lp = plain_logp(reference)
        # a later pass: the sampling policy was elsewhere, on both sides of the clip band
        shift = torch.tensor([[0.3, -0.3, 0.1, -0.25, 0.0]] * 4, dtype=torch.float64) if later_pass else 0.0
        old = plain_logp(model) + shift
    cpu = torch.device("cpu")
    loss, stats, _ = policy_gradient(
        model, prompts, comps, A, mask, N, cpu, torch.float64, eps, beta, old if later_pass else None,
        (lambda: reference) if beta > 0 else None,
    )  # fmt: skip
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    lp = plain_logp(model)
    old_ref = old if later_pass else lp.detach()
    exp_loss, _, exp_clipped, exp_kl = _grpo_reference(
        lp.tolist(), old_ref.tolist(), ref_lp.tolist() if beta > 0 else None, A.tolist(), mask.tolist(), eps, beta
    )
    ratio = torch.exp(lp - old_ref)  # the reference loss again, with autograd for the model's gradient
    surrogate = -torch.minimum(ratio * A[:, None], ratio.clamp(1 - eps, 1 + eps) * A[:, None])
    d = ref_lp - lp
    ((surrogate + beta * (torch.exp(d) - d - 1)) * mask).sum().div(N).backward()
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    assert stats["clipped"].item() == exp_clipped and (exp_clipped > 0) == later_pass
    if beta > 0:
        assert stats["kl"].item() == pytest.approx(exp_kl, rel=1e-4) and exp_kl > 0
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
