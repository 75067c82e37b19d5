"""Optimizers: Muon's orthogonalisation, the schedule, clipping, the flat state round trip."""

from __future__ import annotations

import pytest
import torch

from nanorl.config import resolve
from nanorl.optim import Muon, Optimizers, lr_schedule, orthogonalize


def test_newton_schulz_makes_singular_values_near_one():
    torch.manual_seed(0)
    for shape in ((64, 64), (32, 128), (128, 32)):
        # singular values spread over a decade (a gradient's are), on random orthogonal bases
        k = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], k, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(shape[1], k, dtype=torch.float64))
        g = u @ torch.diag(torch.logspace(-1, 0, k, dtype=torch.float64)) @ v.T
        s = torch.linalg.svdvals(orthogonalize(g.float()).double())
        # the quintic's fixed point band (Jordan's coefficients): about 0.7..1.2, not exactly 1
        assert s.min() > 0.5 and s.max() < 1.3, shape


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
