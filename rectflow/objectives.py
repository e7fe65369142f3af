"""What one training step minimises: one small class per method, each named after its paper.

:func:`rectflow.train.train` owns the loop (batches, optimizer, EMA, checkpoints); an objective
owns the loss of one batch of pairs ``(x0, x1)`` ``(B, *shape)`` at a (0-based) step::

    objective(net, x0, x1, step, ctx) -> (reported, total)

``reported`` is the scalar logged (comparable across runs of a method), ``total`` the scalar
back-propagated. ``ctx`` carries the loop's seeded generator (every random draw comes from it, so a
resumed run draws the same numbers) and its autocast context. No objective synchronises with the
host per step.

- :class:`RectifiedFlowLoss` (Liu et al. 2022): D(x1 − x0, v(x_t, t)), t ~ p(t); with t = 0 only
  (``discrete``, k = 1) it is one-step distillation. Optionally with the adversarial term.
- :class:`SlimFlowLoss` (Zhu, Liu & Liu 2024): annealing reflow of a (small, randomly initialised)
  student on perturbed pairs, then one-step distillation with flow-guided distillation.
- :class:`MeanFlowLoss` (Geng et al. 2025, on couplings as Re-MeanFlow): the average velocity
  u(z, s, e) trained with the MeanFlow identity, one forward-mode JVP per step.

Time convention as everywhere in rectflow: x0 the source, x1 the target, x_t = t·x1 + (1 − t)·x0,
sampling runs t: 0 → 1. MeanFlow's paper runs time the other way; its signs are translated here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from rectflow.flow import interpolate, loss_fn, sample_time

if TYPE_CHECKING:
    from rectflow.adversarial import Adversary

__all__ = [
    "MeanFlowLoss", "Objective", "RectifiedFlowLoss", "SlimFlowLoss", "StepContext", "anneal_beta",
    "meanflow_target", "perturb_source",
]

SourceDraw = Callable[[int, torch.Generator], Tensor]
"""``draw(n, gen)``: ``n`` fresh source draws ``(n, *shape)`` (on the CPU, from ``gen``)."""


@dataclass
class StepContext:
    gen: torch.Generator  # the loop's seeded generator (checkpointed)
    autocast: AbstractContextManager  # bf16 autocast, or a disabled one
    device: torch.device


class Objective(Protocol):
    def __call__(self, net: nn.Module, x0: Tensor, x1: Tensor, step: int, ctx: StepContext,
                 y: Tensor | None = None, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(reported, total)`` scalars for the pairs ``x0, x1`` ``(B, *shape)`` at ``step``;
        ``y`` ``(B,)``: the pairs' class labels for a conditional network (None: unconditional);
        ``w`` ``(B,)``: their guidance scales, for a network that takes them."""
        ...


def _labels(y: Tensor | None, w: Tensor | None = None) -> dict[str, Tensor]:
    """The keywords a conditional network's call takes (none at all for an unconditional one):
    the labels ``y`` and, for a network that takes the guidance scale, each pair's ``w``."""
    return {} if y is None else {"y": y} if w is None else {"y": y, "w": w}


def _bcast(t: Tensor, like: Tensor) -> Tensor:
    """``t`` ``(B,)`` shaped ``(B, 1, …, 1)`` to broadcast against ``like`` ``(B, *shape)``."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class _Distance:
    """D(pred, target) of ``loss`` (l2 or pseudo-Huber), built on the first batch (its dimension)."""

    def __init__(self, loss: str, huber_c: float | None) -> None:
        self.loss, self.huber_c, self.fn = loss, huber_c, None

    def __call__(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.fn is None:
            self.fn = loss_fn(self.loss, math.prod(pred.shape[1:]), self.huber_c)
        return self.fn(pred.float(), target.float())


class RectifiedFlowLoss:
    """k-rectified flow (Liu et al. 2022, eq. 1): ``E_t D(x1 − x0, v(x_t, t))``, t ~ ``time_dist``.

    With ``time_dist = "discrete"`` and ``k`` it is k-step distillation (t ∈ {0, 1/k, …}); k = 1 is
    one-step distillation D(x1 − x0, v(x0, 0)). ``adversary``: adds its −λ·E[D(x̂1)] on
    x̂1 = x_t + (1 − t)·v(x_t, t) to ``total`` (:mod:`rectflow.adversarial`); ``reported`` stays D.
    """

    def __init__(self, time_dist: str, loss: str = "l2", huber_c: float | None = None, k: int | None = None,
                 adversary: Adversary | None = None) -> None:
        self.time_dist, self.k, self.adversary = time_dist, k, adversary
        self.distance = _Distance(loss, huber_c)

    def __call__(self, net: nn.Module, x0: Tensor, x1: Tensor, step: int, ctx: StepContext,
                 y: Tensor | None = None, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
        t = sample_time(self.time_dist, x0.shape[0], ctx.gen, ctx.device, k=self.k)
        xt = interpolate(x0, x1, t)
        with ctx.autocast:
            pred = net(xt, t, **_labels(y, w))
        pred = pred.float()
        loss = self.distance(pred, x1 - x0)
        if self.adversary is None:
            return loss, loss
        x_hat = xt + _bcast(1 - t, xt) * pred  # a NaN here reaches the weights, hence the next logged loss
        with ctx.autocast:
            return loss, loss + self.adversary.student_term(x_hat, x1, y)


def anneal_beta(step: int, steps: int, schedule: str) -> float:
    """SlimFlow's β at (0-based) ``step`` of an annealing over ``steps`` steps: 1 at step 0, 0 from
    step ``steps`` on. ``r = step / steps`` ∈ [0, 1]:

    - ``linear``: β = 1 − r
    - ``cosine``: β = ½(1 + cos(π·r))
    - ``exp``: β = (e^{−5r} − e^{−5}) / (1 − e^{−5})  (fast early decay, exactly 0 at r = 1)
    """
    if steps <= 0 or step >= steps:
        return 0.0
    r = max(0.0, step / steps)
    if schedule == "linear":
        return 1.0 - r
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * r))
    if schedule == "exp":
        return (math.exp(-5.0 * r) - math.exp(-5.0)) / (1.0 - math.exp(-5.0))
    raise ValueError(f"schedule: unknown {schedule!r}; expected linear, cosine or exp")


def perturb_source(x0: Tensor, eps: Tensor, beta: float) -> Tensor:
    """Z0' = sqrt(1 − β²)·Z0 + β·ε ``(B, *shape)``: β = 1 gives ε (pairs independent of Z1), β = 0
    the pairs' own Z0 (exactly: no arithmetic is done at the endpoints)."""
    if beta <= 0.0:
        return x0
    if beta >= 1.0:
        return eps
    return math.sqrt(1.0 - beta * beta) * x0 + beta * eps


class SlimFlowLoss:
    """SlimFlow (Zhu, Liu & Liu 2024) for a student of its own (smaller) architecture.

    Steps ``0 … reflow_steps − 1``, **annealing reflow**: the student is trained as a flow on the
    teacher's pairs with the source perturbed, Z0' = sqrt(1 − β²)·Z0 + β·ε (ε: fresh source draws;
    N(0, I) for a noise source), β from :func:`anneal_beta` over ``anneal_steps``::

        L = D(Z1 − Z0', v(x_t, t)),  x_t = t·Z1 + (1 − t)·Z0',  t ~ time_dist

    Then, **one-step distillation with flow-guided distillation**: with the student's one-step (or
    k-step, ``k``) regression and, on fresh ε, the large teacher's two-step target::

        L = D(Z1 − Z0, v(Z0, 0)) + w·D(v(ε, 0), sg(x̂1 − ε)),
        x_t = ε + t·sg(v(ε, 0)),  t ~ U(t_lo, t_hi),  x̂1 = x_t + (1 − t)·v_T(x_t, t)

    ``adversary`` (optional, :mod:`rectflow.adversarial`): in the second phase adds its −λ·E[D(x̂1)]
    on the student's jump x̂1 = x_t + (1 − t)·v(x_t, t), as with regression (SlimFlow's own
    distillation uses LPIPS there; rectflow has no pretrained perceptual network).
    ``reported`` is the flow loss in the first phase and the regression alone in the second.
    ``phase_starts``: the training loop restarts its EMA of the weights where distillation begins,
    so that the saved student averages distillation's weights only (an EMA of 0.999 carried over
    would keep e^{−3} ≈ 5% of the annealed flow's weights after 3000 steps).
    """

    def __init__(self, *, teacher: nn.Module, draw: SourceDraw, reflow_steps: int, anneal_steps: int,
                 schedule: str, reflow_time_dist: str, guide_weight: float, guide_t: tuple[float, float],
                 loss: str = "l2", huber_c: float | None = None, k: int = 1,
                 adversary: Adversary | None = None) -> None:
        self.teacher, self.draw, self.adversary = teacher, draw, adversary
        self.reflow_steps, self.anneal_steps, self.schedule = reflow_steps, anneal_steps, schedule
        self.reflow_time_dist, self.k = reflow_time_dist, k
        self.guide_weight, self.guide_t = guide_weight, guide_t
        self.distance = _Distance(loss, huber_c)
        self.phase_starts = (reflow_steps,) if reflow_steps > 0 else ()
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        self.teacher.eval()

    def __call__(self, net: nn.Module, x0: Tensor, x1: Tensor, step: int, ctx: StepContext,
                 y: Tensor | None = None, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b = x0.shape[0]
        cond = _labels(y, w)
        if step < self.reflow_steps:
            beta = anneal_beta(step, self.anneal_steps, self.schedule)
            eps = self.draw(b, ctx.gen).to(ctx.device, x0.dtype).reshape(x0.shape)
            z0 = perturb_source(x0, eps, beta)
            t = sample_time(self.reflow_time_dist, b, ctx.gen, ctx.device)
            with ctx.autocast:
                pred = net(interpolate(z0, x1, t), t, **cond)
            loss = self.distance(pred, x1 - z0)
            return loss, loss
        t = sample_time("discrete", b, ctx.gen, ctx.device, k=self.k)
        eps = self.draw(b, ctx.gen).to(ctx.device, x0.dtype).reshape(x0.shape)
        tg = self.guide_t[0] + (self.guide_t[1] - self.guide_t[0]) * torch.rand(b, generator=ctx.gen).to(ctx.device)
        zero = torch.zeros_like(t)
        xt0 = interpolate(x0, x1, t)
        with ctx.autocast:  # the regression's and the guide's student forwards in one batch
            both = _labels(None if y is None else torch.cat([y, y]), None if w is None else torch.cat([w, w]))
            out = net(torch.cat([xt0, eps]), torch.cat([t, zero]), **both).float()
        pred, v_eps = out[:b], out[b:]
        loss = self.distance(pred, x1 - x0)
        total = loss
        if self.adversary is not None:
            with ctx.autocast:
                total = total + self.adversary.student_term(xt0 + _bcast(1 - t, xt0) * pred, x1, y)
        if self.guide_weight <= 0:
            return loss, total
        with torch.no_grad():
            xt = eps + _bcast(tg, eps) * v_eps.detach()
            with ctx.autocast:
                vt = self.teacher(xt, tg, **cond).float()
            x_hat = xt + _bcast(1 - tg, xt) * vt
        return loss, total + self.guide_weight * self.distance(v_eps, x_hat - eps)


def meanflow_target(u: Callable[[Tensor, Tensor, Tensor], Tensor], z: Tensor, s: Tensor, e: Tensor,
                    v: Tensor) -> tuple[Tensor, Tensor]:
    """``(u(z, s, e), target)`` of the MeanFlow identity in rectflow's time (source at 0)::

        target = v + (e − s)·d/ds u(z_s, s, e),   d/ds u = ∂_z u·v + ∂_s u

    the total derivative along (dz, ds, de) = (v, 1, 0), one forward-mode JVP
    (``torch.func.jvp``). ``z, v`` ``(B, *shape)``, ``s, e`` ``(B,)``. The target is detached
    (MeanFlow's stop-gradient); the returned ``u`` keeps its graph for the loss.
    """
    ones, zeros = torch.ones_like(s), torch.zeros_like(e)
    out, du_ds = torch.func.jvp(u, (z, s, e), (v, ones, zeros))
    return out, (v + _bcast(e - s, v) * du_ds).detach()


class MeanFlowLoss:
    """MeanFlow (Geng et al. 2025) on couplings: the average velocity u(z, s, e) = 1/(e − s)·∫_s^e v
    of the flow from the pairs (Re-MeanFlow), so that z_e = z_s + (e − s)·u(z_s, s, e) and one step
    is z1 = z0 + u(z0, 0, 1).

    Per sample: two times from ``time_dist``, s their minimum and e their maximum, except that with
    probability 1 − ``ratio`` e = s (plain flow matching: u(z, s, s) = v(z, s)); z_s = s·x1 + (1 − s)·x0,
    v = x1 − x0, and ``L = D(u_θ(z_s, s, e), sg(v + (e − s)·d/ds u_θ))`` (:func:`meanflow_target`).
    With ``norm_p`` > 0, D is MeanFlow's adaptively weighted squared error, sg(1/(Δ + c)^p)·Δ with
    Δ = ‖u_θ − target‖² per sample and c = ``norm_eps`` (its paper: p = 1 on ImageNet, 0.75 on
    CIFAR-10); with 0, the configured distance. ``reported`` is the plain mean squared error.
    The network takes ``net(z, s, e)`` (``rectflow.nets``: ``average: true``). The step runs in
    fp32 even with ``precision: bf16`` (forward-mode AD does not pass bf16 autocast's convolutions).
    """

    def __init__(self, time_dist: str, ratio: float, loss: str = "l2", huber_c: float | None = None,
                 norm_p: float = 0.0, norm_eps: float = 1e-3) -> None:
        self.time_dist, self.ratio, self.norm_p, self.norm_eps = time_dist, ratio, norm_p, norm_eps
        self.distance = _Distance(loss, huber_c)

    def times(self, n: int, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(s, e)`` ``(n,)`` each, s ≤ e."""
        a = sample_time(self.time_dist, n, gen, device)
        b = sample_time(self.time_dist, n, gen, device)
        keep = (torch.rand(n, generator=gen) < self.ratio).to(device)
        s = torch.minimum(a, b)
        return s, torch.where(keep, torch.maximum(a, b), s)

    def __call__(self, net: nn.Module, x0: Tensor, x1: Tensor, step: int, ctx: StepContext,
                 y: Tensor | None = None, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
        cond = _labels(y, w)
        s, e = self.times(x0.shape[0], ctx.gen, ctx.device)
        z = interpolate(x0, x1, s)
        v = (x1 - x0).to(z.dtype)
        # In fp32 whatever the precision: forward-mode AD under bf16 autocast fails in convolutions
        # (the tangent keeps fp32 while autocast casts the weights; torch 2.13, CPU).
        inner = getattr(net, "module", None)  # DDP: its forward cannot run inside a functorch transform
        if isinstance(inner, nn.Module):
            with torch.no_grad():  # the (stop-gradient) target from the module itself, u from DDP's forward
                _, target = meanflow_target(lambda z_, s_, e_: inner(z_, s_, e_, **cond), z, s, e, v)
            u = net(z, s, e, **cond)
        else:
            u, target = meanflow_target(lambda z_, s_, e_: net(z_, s_, e_, **cond), z, s, e, v)
        if self.norm_p <= 0:
            loss = self.distance(u, target)
            return loss, loss
        sq = (u.float() - target.float()).pow(2).flatten(1)
        delta = sq.sum(1)  # (B,)
        weight = (delta.detach() + self.norm_eps).pow(-self.norm_p)
        return sq.mean(), (weight * delta).mean()
