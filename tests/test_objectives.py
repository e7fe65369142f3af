"""The distillation methods' objectives against closed forms (rectflow.objectives): MeanFlow's
identity and target, SlimFlow's annealing schedule and perturbed pairs, the average-velocity
networks (warm start, Euler steps)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from rectflow.flow import interpolate
from rectflow.nets import build_model
from rectflow.objectives import (
    MeanFlowLoss,
    RectifiedFlowLoss,
    SlimFlowLoss,
    StepContext,
    anneal_beta,
    meanflow_target,
    perturb_source,
)
from rectflow.solvers import solve

MLP = {"kind": "mlp", "shape": [2], "hidden": 32, "depth": 2, "time_embed": 8}
UNET = {"kind": "unet", "shape": [1, 8, 8], "channels": 8, "channel_mult": [1, 2], "attention": True,
        "time_embed": 8, "dropout": 0.0}


def _ctx(seed: int = 0) -> StepContext:
    return StepContext(torch.Generator().manual_seed(seed), torch.autocast("cpu", enabled=False), torch.device("cpu"))


def _b(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1)))


# ----------------------------------------------------------------------------------------- MeanFlow

def test_meanflow_target_is_v_for_a_straight_constant_field() -> None:
    c = torch.tensor([[1.5, -0.5]])

    def u(z: Tensor, s: Tensor, e: Tensor) -> Tensor:  # a straight flow: the average is the velocity
        return c.expand_as(z) + 0 * z

    z, v = torch.randn(7, 2), c.expand(7, 2)
    s = torch.rand(7) * 0.5
    out, target = meanflow_target(u, z, s, s + 0.4, v)
    assert torch.equal(target, v) and torch.equal(out, v)


@pytest.mark.parametrize("a", [-1.3, 0.7])
def test_meanflow_identity_holds_for_a_linear_field(a: float) -> None:
    """dz/dt = a·z: z_e = z_s·e^{a(e−s)}, so u*(z, s, e) = z·(e^{a(e−s)} − 1)/(e − s); with v = a·z the
    MeanFlow target v + (e − s)·d/ds u* is u* itself (the identity)."""
    torch.manual_seed(0)
    z = torch.randn(64, 3, dtype=torch.float64)
    s = torch.rand(64, dtype=torch.float64) * 0.6
    e = s + 0.05 + torch.rand(64, dtype=torch.float64) * 0.35

    def u_star(z_: Tensor, s_: Tensor, e_: Tensor) -> Tensor:
        d = (e_ - s_)[:, None]
        return z_ * torch.expm1(a * d) / d

    out, target = meanflow_target(u_star, z, s, e, a * z)
    torch.testing.assert_close(target, out, rtol=1e-12, atol=1e-12)
    # and the one-step map of u* is the exact flow map
    torch.testing.assert_close(z + (e - s)[:, None] * out, z * torch.exp(a * (e - s))[:, None])


def test_meanflow_target_with_a_time_dependent_field() -> None:
    """dz/dt = 2t (z-free): z_e − z_s = e² − s², u* = e + s; target = v + (e − s)·∂_s u* = 2s + (e − s)."""
    s = torch.tensor([0.1, 0.3, 0.0]); e = torch.tensor([0.5, 0.3, 1.0])
    z = torch.zeros(3, 1)
    _, target = meanflow_target(lambda z_, s_, e_: (e_ + s_)[:, None] + 0 * z_, z, s, e, (2 * s)[:, None])
    torch.testing.assert_close(target, (e + s)[:, None])


@pytest.mark.parametrize("arch", [MLP, UNET], ids=["mlp", "unet"])
def test_meanflow_gradient_through_the_jvp_equals_a_plain_forward(arch: dict) -> None:
    torch.manual_seed(1)
    net = build_model(arch | {"average": True})
    for q in net.parameters():
        nn.init.normal_(q, std=0.2)
    x = torch.randn(6, *arch["shape"]); v = torch.randn_like(x)
    s = torch.rand(6) * 0.5; e = s + 0.3
    u, target = meanflow_target(lambda a, b, c: net(a, b, c), x, s, e, v)
    assert not target.requires_grad
    g1 = torch.autograd.grad((u - target).pow(2).mean(), list(net.parameters()))
    g2 = torch.autograd.grad((net(x, s, e) - target).pow(2).mean(), list(net.parameters()))
    for a_, b_ in zip(g1, g2):
        torch.testing.assert_close(a_, b_)


def test_meanflow_times_mix_flow_matching_and_intervals() -> None:
    obj = MeanFlowLoss("uniform", ratio=0.25)
    s, e = obj.times(20_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert bool((s <= e).all())
    assert abs(float((e > s).float().mean()) - 0.25) < 0.02
    assert torch.equal(MeanFlowLoss("uniform", ratio=0.0).times(100, torch.Generator().manual_seed(0), "cpu")[1],
                       MeanFlowLoss("uniform", ratio=0.0).times(100, torch.Generator().manual_seed(0), "cpu")[0])


def test_meanflow_learns_the_one_step_map_of_straight_pairs() -> None:
    """Pairs x1 = x0 + c: the average velocity is c everywhere, and a few hundred steps find it."""
    torch.manual_seed(0)
    net = build_model(MLP | {"average": True})
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    obj, ctx = MeanFlowLoss("uniform", 0.5, norm_p=1.0), _ctx()
    c = torch.tensor([2.0, -1.0])
    for step in range(400):
        x0 = torch.randn(256, 2)
        _, total = obj(net, x0, x0 + c, step, ctx)
        opt.zero_grad(); total.backward(); opt.step()
    z0 = torch.randn(512, 2)
    with torch.no_grad():
        one = solve(net, z0, "euler", 1)
    assert one.nfe == 1
    assert float((one.x - (z0 + c)).pow(2).mean()) < 1e-3


def test_an_average_network_without_end_is_its_instantaneous_velocity() -> None:
    net = build_model(MLP | {"average": True})
    flow = build_model(MLP)
    x, t = torch.randn(4, 2), torch.rand(4)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), net(x, t, t))
    assert sum(q.numel() for q in net.parameters()) == sum(q.numel() for q in flow.parameters())
    unet_avg, unet = build_model(UNET | {"average": True}), build_model(UNET)
    assert sum(q.numel() for q in unet_avg.parameters()) == sum(q.numel() for q in unet.parameters())
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model(MLP | {"average": True, "time_embed": 6})
    with pytest.raises(ValueError, match="end"):
        flow(x, t, torch.ones(4))


def test_euler_steps_an_average_network_by_its_interval() -> None:
    """A constructed exact u* of dz/dt = a·z: Euler with 1, 2 or 5 steps lands on z0·e^a exactly."""
    a = 0.8

    class Exact(nn.Module):
        average_velocity = True

        def forward(self, z: Tensor, t: Tensor, end: Tensor | None = None) -> Tensor:
            if end is None:
                return a * z
            d = _b(end - t, z)
            return z * torch.expm1(a * d) / d

    z0 = torch.randn(9, 2, dtype=torch.float64)
    for k in (1, 2, 5):
        sol = solve(Exact(), z0, "euler", k)
        assert sol.nfe == k
        torch.testing.assert_close(sol.x, z0 * math.exp(a))
    back = solve(Exact(), z0 * math.exp(a), "euler", 200, reverse=True)  # backwards: instantaneous v
    torch.testing.assert_close(back.x, z0, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------------------- SlimFlow

@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp"])
def test_anneal_beta_endpoints_and_monotone(schedule: str) -> None:
    betas = [anneal_beta(s, 100, schedule) for s in range(0, 121)]
    assert betas[0] == 1.0 and betas[100] == 0.0 and betas[120] == 0.0
    assert all(b1 <= b0 for b0, b1 in zip(betas, betas[1:]))
    assert anneal_beta(0, 0, schedule) == 0.0  # no annealing: the pairs from the start


def test_perturbed_source_endpoints() -> None:
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    assert perturb_source(x0, eps, 1.0) is eps  # independent of the pairs (and of Z1)
    assert perturb_source(x0, eps, 0.0) is x0  # the pairs themselves
    mid = perturb_source(x0, eps, 0.6)
    torch.testing.assert_close(mid, 0.8 * x0 + 0.6 * eps)


class _Recorder(nn.Module):
    """v(x, t) = 0, recording its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.w * x


def test_slimflow_annealing_reflow_trains_on_independent_pairs_then_the_pairs() -> None:
    x0, x1 = torch.randn(64, 2), torch.randn(64, 2) + 5.0
    draws: list[Tensor] = []

    def draw(n: int, g: torch.Generator) -> Tensor:
        draws.append(torch.randn(n, 2, generator=g))
        return draws[-1]

    student, big = _Recorder(), _Recorder()
    obj = SlimFlowLoss(teacher=big, draw=draw, reflow_steps=10, anneal_steps=5, schedule="linear",
                       reflow_time_dist="uniform", guide_weight=0.0, guide_t=(0.2, 0.8))
    for step in (0, 7):  # β = 1, then β = 0 (annealing over 5 of the 10 reflow steps)
        loss, _ = obj(student, x0, x1, step, _ctx(step))
        xt, t = student.calls[-1]
        z0 = draws[-1] if step == 0 else x0
        torch.testing.assert_close(xt, interpolate(z0, x1, t))
        torch.testing.assert_close(loss, (x1 - z0).pow(2).mean())  # v = 0: D(Z1 − Z0', 0)
    assert not big.calls


def test_slimflow_distillation_adds_the_teachers_two_step_target() -> None:
    torch.manual_seed(0)
    x0, x1 = torch.randn(32, 2), torch.randn(32, 2)
    c = torch.tensor([1.0, 2.0])

    class Const(nn.Module):
        def __init__(self, value: Tensor) -> None:
            super().__init__()
            self.v = nn.Parameter(value.clone())

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            return self.v.expand_as(x) + 0 * x

    student, teacher = Const(torch.zeros(2)), Const(c)
    eps = torch.randn(32, 2)
    obj = SlimFlowLoss(teacher=teacher, draw=lambda n, g: eps, reflow_steps=0, anneal_steps=0, schedule="linear",
                       reflow_time_dist="uniform", guide_weight=0.5, guide_t=(0.2, 0.8))
    loss, total = obj(student, x0, x1, 0, _ctx())
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean())
    # student v(ε, 0) = 0 → x_t = ε, x̂1 = ε + (1 − t)·c, target x̂1 − ε = (1 − t)·c, t ~ U(0.2, 0.8)
    guide = (total - loss).detach() / 0.5
    assert 0.04 * float(c.pow(2).mean()) <= float(guide) <= 0.64 * float(c.pow(2).mean())
    assert not any(q.requires_grad for q in teacher.parameters())


def test_rectified_flow_loss_at_t0_is_one_step_regression() -> None:
    x0, x1 = torch.randn(16, 2), torch.randn(16, 2)
    net = _Recorder()
    loss, total = RectifiedFlowLoss("discrete", k=1)(net, x0, x1, 0, _ctx())
    assert torch.equal(net.calls[-1][1], torch.zeros(16)) and torch.equal(net.calls[-1][0], x0)
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean())
    assert total is loss


def test_slimflow_restarts_the_weight_average_where_distillation_begins(tmp_path) -> None:
    """An EMA carried across SlimFlow's phases would keep the annealed flow's weights in the student:
    the loop restarts it at ``phase_starts`` (decay 0 there), so the saved weights are an EMA of the
    distillation steps alone: e = w3, then e = d·e + (1 − d)·w_s with d = (1 + s − 3)/(10 + s − 3)."""
    from types import SimpleNamespace

    from rectflow.train import train

    class Pairs:
        def __init__(self) -> None:
            self.g = torch.Generator().manual_seed(0)

        def next_batch(self, n: int) -> tuple[Tensor, Tensor]:
            x0 = torch.randn(n, 2, generator=self.g)
            return x0, x0 + 1.0

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state: dict) -> None:
            pass

    class Phased:
        phase_starts = (3,)

        def __init__(self) -> None:
            self.before: list[list[Tensor]] = []  # weights before step s = weights after step s − 1

        def __call__(self, net, x0, x1, step, ctx):
            self.before.append([q.detach().clone() for q in net.parameters()])
            loss = (net(x0, torch.zeros(len(x0))) - (x1 - x0)).pow(2).mean()
            return loss, loss

    def run(ema: float, name: str) -> tuple[list[Tensor], Phased]:
        cfg = SimpleNamespace(steps=6, batch_size=8, lr=1e-2, weight_decay=0.0, warmup=0, lr_schedule="constant",
                              grad_clip=0.0, ema=ema, time_dist="uniform", loss="l2", huber_c=None, precision="fp32",
                              checkpoint_every=1000, log_every=2)
        torch.manual_seed(0)
        net, obj = build_model(MLP), Phased()
        train(net, Pairs(), cfg, name=name, seed=0, checkpoint_dir=tmp_path / name, objective=obj)
        return [q.detach().clone() for q in net.parameters()], obj

    averaged, _ = run(0.999, "ema")
    raw, obj = run(0.0, "raw")  # the same steps (the average never feeds back): the raw weights
    w3, w4, w5 = obj.before[4], obj.before[5], raw
    d4, d5 = 2 / 11, 3 / 12
    for a, q3, q4, q5 in zip(averaged, w3, w4, w5):
        torch.testing.assert_close(a, d5 * (d4 * q3 + (1 - d4) * q4) + (1 - d5) * q5)


def test_slimflow_adds_the_adversarial_term_in_distillation_only() -> None:
    class Fixed:
        calls = 0

        def student_term(self, fake: Tensor, real: Tensor, y: Tensor | None = None) -> Tensor:
            assert y is None  # unconditional pairs: no labels for the discriminator
            Fixed.calls += 1
            return torch.tensor(0.25)

    x0, x1 = torch.randn(8, 2), torch.randn(8, 2)
    obj = SlimFlowLoss(teacher=_Recorder(), draw=lambda n, g: torch.randn(n, 2, generator=g), reflow_steps=2,
                       anneal_steps=1, schedule="linear", reflow_time_dist="uniform", guide_weight=0.0,
                       guide_t=(0.2, 0.8), adversary=Fixed())  # type: ignore[arg-type]
    loss, total = obj(_Recorder(), x0, x1, 0, _ctx())
    assert torch.equal(loss, total) and Fixed.calls == 0  # annealing reflow: no discriminator
    loss, total = obj(_Recorder(), x0, x1, 2, _ctx())
    assert Fixed.calls == 1 and torch.allclose(total - loss, torch.tensor(0.25))


def test_meanflow_with_an_adversarial_weight_is_refused_naming_the_key() -> None:
    from pathlib import Path

    from rectflow.config import ParamsError
    from rectflow.params import load_params

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    with pytest.raises(ParamsError, match="distill.adversarial.weight: the adversarial term is for distill.method"):
        load_params(params, ["distill.method=meanflow", "distill.adversarial.weight=0.1"])
    load_params(params, ["distill.method=slimflow", "distill.adversarial.weight=0.1"])  # allowed


def test_meanflow_needs_a_time_embedding_it_can_halve() -> None:
    from pathlib import Path

    from rectflow.config import ParamsError
    from rectflow.params import load_params

    params = Path(__file__).resolve().parents[1] / "params.yaml"
    with pytest.raises(ParamsError, match=r"distill\.student\.time_embed: distill\.method 'meanflow' .* got 6"):
        load_params(params, ["distill.method=meanflow", "distill.student={time_embed: 6}"])
    with pytest.raises(ParamsError, match=r"model\.time_embed: .* got 62"):
        load_params(params, ["distill.method=meanflow", "model.time_embed=62"])
