"""Time distributions, distances and path metrics against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rectflow import metrics
from rectflow.flow import interpolate, pseudo_huber, sample_time, squared_l2, u_shaped_density


def test_interpolation_convention():
    x0, x1 = torch.zeros(3, 2), torch.ones(3, 2) * 4
    t = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(interpolate(x0, x1, t), torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, 4.0]]))


def test_u_shaped_sampler_matches_its_density():
    g = torch.Generator().manual_seed(0)
    t = sample_time("u_shaped", 400_000, g).double()
    hist, edges = np.histogram(t.numpy(), bins=40, range=(0, 1), density=True)
    centers = torch.tensor((edges[:-1] + edges[1:]) / 2)
    # bin average of the closed-form density a·cosh(a(t−½)) / (2 sinh(a/2))
    a = 4.0
    lo, hi = torch.tensor(edges[:-1]), torch.tensor(edges[1:])
    avg = (torch.sinh(a * (hi - 0.5)) - torch.sinh(a * (lo - 0.5))) / (2 * math.sinh(a / 2)) / (hi - lo)
    assert np.abs(hist - avg.numpy()).max() < 0.05
    assert u_shaped_density(centers).sum() * (1 / 40) == pytest.approx(1.0, abs=1e-2)
    assert float(t.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(t.min()) >= 1e-5 - 1e-9 and float(t.max()) <= 1 - 1e-5 + 1e-7


def test_logit_normal_and_uniform_and_discrete():
    g = torch.Generator().manual_seed(1)
    t = sample_time("logit_normal", 200_000, g)
    phi1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    assert float((t < torch.sigmoid(torch.tensor(1.0))).float().mean()) == pytest.approx(phi1, abs=0.005)
    u = sample_time("uniform", 100_000, g)
    assert float(u.min()) >= 1e-3 and float(u.mean()) == pytest.approx((1 + 1e-3) / 2, abs=0.005)
    d = sample_time("discrete", 10_000, g, k=4)
    assert set(d.unique().tolist()) == {0.0, 0.25, 0.5, 0.75}


def test_pseudo_huber_limits():
    x = torch.zeros(1, 3)
    c = 0.01
    assert float(pseudo_huber(x, x, c)) == 0.0
    far = torch.tensor([[30.0, 40.0, 0.0]])  # ‖·‖ = 50 ≫ c: ≈ ‖x − y‖ − c
    assert float(pseudo_huber(far, x, c)) == pytest.approx(50 - c, rel=1e-6)
    near = torch.tensor([[1e-4, 0.0, 0.0]])  # ‖·‖ ≪ c: ≈ ‖x − y‖² / (2c)
    assert float(pseudo_huber(near, x, c)) == pytest.approx(1e-8 / (2 * c), rel=1e-3)
    assert float(squared_l2(far, x)) == pytest.approx(2500 / 3)


def test_straightness_zero_for_a_straight_field():
    z0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    assert metrics.straightness(lambda z, t: torch.full_like(z, 0.3), z0, 100) == pytest.approx(0.0, abs=1e-10)


def test_straightness_of_an_accelerating_field_matches_discrete_closed_form():
    c = torch.tensor([1.0, 2.0])
    z0 = torch.zeros(8, 2, dtype=torch.float64)
    n = 100
    s = metrics.straightness(lambda z, t: 2 * t[:, None] * c.to(z), z0, n)
    # Euler on v = 2tc: Z1 − Z0 = (1 − 1/N)c; S = ‖c‖²/N Σ_k (1 − 1/N − 2k/N)²
    k = np.arange(n)
    expected = float((c**2).sum()) * np.mean((1 - 1 / n - 2 * k / n) ** 2)
    assert s == pytest.approx(expected, rel=1e-9)
    assert s == pytest.approx(5 / 3, rel=0.02)  # the continuous value ‖c‖²/3


def test_w2_closed_forms():
    g = np.random.default_rng(0)
    a = g.normal(size=(300, 2))
    assert metrics.w2(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([3.0, -4.0])
    assert metrics.w2(a, a + shift) == pytest.approx(5.0, rel=1e-9)
    # 1-D: the optimal coupling is the sorted matching
    x, y = g.normal(size=(200, 1)), g.exponential(size=(200, 1))
    sorted_w2 = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert metrics.w2(x, y) == pytest.approx(sorted_w2, rel=1e-9)


def test_mmd_is_zero_on_identical_sets_and_grows_with_shift():
    a = torch.randn(400, 2, generator=torch.Generator().manual_seed(0))
    assert metrics.mmd(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.mmd(a, a + 0.5) < metrics.mmd(a, a + 2.0)


def test_transport_cost():
    z0 = torch.zeros(10, 2)
    assert metrics.transport_cost(z0, z0 + torch.tensor([3.0, 4.0])) == pytest.approx(25.0)


def test_batch_losses_are_the_batch_means_of_the_distances():
    from rectflow.flow import loss_fn

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(7, 1, 4, 4, generator=g), torch.randn(7, 1, 4, 4, generator=g)
    assert torch.allclose(loss_fn("l2", 16)(pred, target), squared_l2(pred, target).mean())
    assert torch.allclose(loss_fn("pseudo_huber", 16, 0.1)(pred, target), pseudo_huber(pred, target, 0.1).mean())


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_clip_grad_norm_matches_torch(scale):
    from rectflow.train import clip_grad_norm

    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 5), torch.nn.Linear(3, 5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3) * scale
    for m in (a, b):
        m(x).pow(2).sum().backward()
    clip_grad_norm(list(a.parameters()), 1.0)
    torch.nn.utils.clip_grad_norm_(list(b.parameters()), 1.0)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_learning_rate_schedules():
    from rectflow.config import PretrainParams
    from rectflow.train import learning_rate

    const = PretrainParams(steps=1000, lr=1e-3, warmup=100)
    cos = const.model_copy(update={"lr_schedule": "cosine"})
    for cfg in (const, cos):  # the same linear warm-up: lr·(s + 1)/warmup
        assert [learning_rate(cfg, s) for s in (0, 49, 99)] == pytest.approx([1e-5, 5e-4, 1e-3])
    assert all(learning_rate(const, s) == 1e-3 for s in (100, 500, 999))
    # cosine: lr·½(1 + cos(π·(s − warmup)/(steps − warmup))): full at the end of warm-up, half midway
    assert learning_rate(cos, 100) == pytest.approx(1e-3)
    assert learning_rate(cos, 550) == pytest.approx(5e-4)
    assert learning_rate(cos, 999) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 899 / 900)))
    lrs = [learning_rate(cos, s) for s in range(100, 1000)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    no_warmup = cos.model_copy(update={"warmup": 0})
    assert learning_rate(no_warmup, 0) == pytest.approx(1e-3) and learning_rate(no_warmup, 500) == pytest.approx(5e-4)


def test_straightness_from_an_euler_row_is_the_same_bits_as_its_own_run():
    """evaluate measures S(Z) on the flow's uniform Euler row (its velocities recorded) instead of
    integrating the flow again: the figure must be bit-identical, guided velocities included."""
    from rectflow.guidance import Guided
    from rectflow.nets import MLPVelocity
    from rectflow.solvers import solve

    torch.manual_seed(0)
    plain = MLPVelocity((2,), 32, 2, 16)
    cond = MLPVelocity((2,), 32, 2, 16, classes=3)
    with torch.no_grad():  # the null row starts at zero: give every class its own velocity
        for prm in cond.cond.label.parameters():
            prm.normal_()
    z0 = torch.randn(64, 2)
    for v in (plain, Guided(cond, torch.arange(64) % 3, 2.0)):
        with torch.inference_mode():
            rec = metrics.VelocityRecorder(v)
            sol = solve(rec, z0, "euler", 50)
            assert sol.nfe == 50 * getattr(v, "forwards", 1) and len(rec.vs) == 50
            assert torch.equal(sol.x, solve(v, z0, "euler", 50).x)
            assert metrics.straightness_of(z0, sol.x, rec.vs) == metrics.straightness(v, z0, 50)


def test_latency_times_a_long_call_once_and_a_short_one_best_of_repeats():
    import time as _time

    calls = []

    def slow():
        calls.append(1)
        _time.sleep(0.25)

    ms = metrics.latency_ms(slow, batch=10, long_s=0.2)
    assert len(calls) == 1 and ms == pytest.approx(25.0, rel=0.5)
    calls.clear()
    metrics.latency_ms(lambda: calls.append(1), batch=10, repeats=3, warmup=2)
    assert len(calls) == 1 + 1 + 3  # the first call (a warm-up), one more warm-up, three timed
