"""Optimizers: Muon's orthogonalisation, the schedule, clipping, the flat state round trip."""

from __future__ import annotations

import pytest
import torch

from nanorl.config import resolve
from nanorl.optim import Muon, Optimizers, lr_schedule, orthogonalize

# Jordan's quintic, as documented (written out here, not read from nanorl.optim)
QUINTIC = (3.4445, -4.7750, 2.0315)


def _quintic(s: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = QUINTIC
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def _newton_schulz_reference(g: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz on a matrix acts on each singular value alone: U·p(S / |g|_F)·Vᵀ, p the quintic 5 times
    (float64, by SVD)."""
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    return u @ torch.diag(_quintic(s / torch.linalg.matrix_norm(g.double()))) @ vh


def _with_singular_values(rows: int, cols: int, s: torch.Tensor) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), dtype=torch.float64))
    return u @ torch.diag(s) @ v.T


def test_newton_schulz_is_the_quintic_on_each_singular_value():
    torch.manual_seed(0)
    for shape in ((64, 64), (32, 128), (128, 32)):
        g = torch.randn(*shape)
        torch.testing.assert_close(orthogonalize(g).double(), _newton_schulz_reference(g), rtol=0, atol=2e-5)


def test_newton_schulz_singular_values_stay_in_the_documented_band():
    # nanorl.optim's comment: a singular value at least 1% of the matrix's Frobenius norm comes out in 0.68..1.14,
    # and none above 1.21; a smaller one is left smaller (1e-3 -> 0.47)
    s = torch.logspace(-6, 0, 200_001, dtype=torch.float64)
    out = _quintic(s)
    assert 0.68 < out[s >= 0.01].min() < 0.69 and 1.13 < out[s >= 0.01].max() < 1.14
    assert 1.20 < out.max() < 1.21
    assert 0.47 < out[s >= 1e-3].min() < 0.48
    torch.manual_seed(0)
    for shape in ((64, 64), (32, 128), (128, 32)):
        # singular values spread over a decade and a half (a gradient's are), each >= 1% of the Frobenius norm
        sv = torch.logspace(-1.5, 0, min(shape), dtype=torch.float64)
        assert (sv / sv.norm()).min() >= 0.01
        got = torch.linalg.svdvals(orthogonalize(_with_singular_values(*shape, sv).float()).double())
        assert got.min() > 0.68 and got.max() < 1.14, shape


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    # Muon orthogonalises same-shape matrices as one batch; each must come out as it would alone, scaled by
    # its own norm (a batch-wide norm would shrink the smaller matrix's update)
    torch.manual_seed(1)
    for shape in ((48, 48), (96, 32)):
        g = torch.randn(3, *shape) * torch.tensor([1.0, 10.0, 0.1])[:, None, None]
        together = orthogonalize(g)
        for i in range(3):
            torch.testing.assert_close(together[i], orthogonalize(g[i]), atol=2e-5, rtol=2e-5)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_lr_schedule_shape():
    f = [lr_schedule(s, 10, 0.2, 0.5, 0.1) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == 1.0 and f[4] == 1.0
    assert f[5] == pytest.approx(1.0) and f[9] == pytest.approx(0.2 + 0.8 * 0.1)
    assert all(a >= b for a, b in zip(f[5:], f[6:], strict=False))
    assert [lr_schedule(s, 4, 0.0, 0.0, 0.0) for s in range(4)] == [1.0] * 4


def _model():
    from nanorl.model import GPT

    cfg = resolve(overrides=["model.depth=2", "model.n_embd=64", "model.n_head=1", "model.vocab_size=300"])
    torch.manual_seed(0)
    m = GPT(cfg.model)
    m.init_weights()
    return cfg, m


def test_groups_cover_every_parameter_once_and_training_lowers_the_loss():
    cfg, m = _model()
    opt = Optimizers(m, cfg.optim)
    assert sorted(map(id, opt.params)) == sorted(map(id, m.parameters()))
    x = torch.randint(0, 300, (4, 32))
    first = None
    for _ in range(15):
        loss = m(x, x)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 1.0


def test_clipping_bounds_the_gradient_norm():
    cfg, m = _model()
    cfg.optim.grad_clip = 0.5
    opt = Optimizers(m, cfg.optim)
    x = torch.randint(0, 300, (2, 16))
    (m(x, x) * 1000).backward()
    norm = opt.clip()
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None]))
    assert norm > 0.5 and after.item() == pytest.approx(0.5, rel=1e-4)


def test_flat_state_round_trip_continues_identically():
    cfg, m1 = _model()
    _, m2 = _model()
    o1, o2 = Optimizers(m1, cfg.optim), Optimizers(m2, cfg.optim)
    x = torch.randint(0, 300, (2, 16))
    for _ in range(2):
        m1(x, x).backward()
        o1.step()
    m2.load_state_dict(m1.state_dict())
    o2.load_state_tensors(o1.state_tensors())
    o1.set_lr(0.5)
    o2.set_lr(0.5)
    for m, o in ((m1, o1), (m2, o2)):
        m(x, x).backward()
        o.step()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=False):
        assert torch.equal(a, b)
    bad = {k: torch.zeros(3) if k.endswith("momentum_buffer") else v for k, v in o1.state_tensors().items()}
    with pytest.raises(ValueError, match="shape"):
        o2.load_state_tensors(bad)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_step_is_orthogonalised_momentum_scaled_for_tall_matrices(nesterov):
    # two steps against float64 by hand: buf = m·buf + (1 - m)·g; the update is (1 - m)·g + m·buf with Nesterov,
    # else buf; W -= lr · sqrt(max(1, rows/cols)) · NS(update)
    torch.manual_seed(2)
    lr, m = 0.05, 0.9
    for shape in ((48, 16), (16, 48), (24, 24)):
        w0 = torch.randn(*shape)
        p = torch.nn.Parameter(w0.clone())
        opt = Muon([p], lr=lr, momentum=m, nesterov=nesterov)
        w, buf = w0.double(), torch.zeros(*shape, dtype=torch.float64)
        for _ in range(2):
            g = torch.randn(*shape)
            p.grad = g.clone()
            opt.step()
            buf = m * buf + (1 - m) * g.double()
            update = (1 - m) * g.double() + m * buf if nesterov else buf
            w = w - lr * max(1.0, shape[0] / shape[1]) ** 0.5 * _newton_schulz_reference(update)
        torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-5)


def test_the_embedding_and_head_go_to_adamw_every_block_matrix_to_muon():
    cfg, m = _model()
    opt = Optimizers(m, cfg.optim)
    adam = [p for g in opt.adamw.param_groups for p in g["params"]]
    muon = [p for g in opt.muon.param_groups for p in g["params"]]
    assert [id(p) for p in adam] == [id(m.wte.weight), id(m.lm_head.weight)]
    assert {id(p) for p in muon} == {id(p) for p in m.blocks.parameters()} and all(p.ndim == 2 for p in muon)
    assert len(adam) + len(muon) == len(list(m.parameters()))  # no norm gains or biases left out
    # (the groups' rates: tests/test_pinned.py, test_adamw_groups_rates_and_weight_decay)


def test_without_clipping_the_norm_is_still_the_global_norm_and_gradients_are_untouched():
    # (with clipping: tests/test_pinned.py, test_clip_reports_the_norm_before_clipping, and the bound above)
    cfg, m = _model()
    cfg.optim.grad_clip = 0.0
    opt = Optimizers(m, cfg.optim)
    x = torch.randint(0, 300, (2, 16))
    (m(x, x) * 100).backward()
    before = [p.grad.clone() for p in m.parameters()]
    total = sum(g.double().square().sum() for g in before).sqrt().item()
    assert opt.clip() == pytest.approx(total, rel=1e-5) and total > 1
    assert all(torch.equal(g, p.grad) for g, p in zip(before, m.parameters(), strict=True))


def test_lr_schedule_at_its_boundaries():
    # 10 steps, 3 of warmup, 4 of warmdown to 0.1: step 0 is 1/3, the last warmup step reaches 1, the first warmdown
    # step is still 1, and the last is one warmdown step above final_lr_frac (the factor reaches it after the
    # last step, as nanochat's)
    f = [lr_schedule(s, 10, 0.3, 0.4, 0.1) for s in range(10)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and f[3:7] == [1.0, 1.0, 1.0, 1.0]
    assert f[7:] == pytest.approx([0.1 + 0.9 * k / 4 for k in (3, 2, 1)])
    # SFT's whole-stage warmdown to 0: 1 at step 0, 1/steps at the last
    assert [lr_schedule(s, 4, 0.0, 1.0, 0.0) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
