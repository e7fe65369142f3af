"""The rectified-flow objective: straight path, time distributions p(t), distances.

k-rectified flow (Liu et al. 2022, eq. 1)::

    min_θ  E_{t ~ p(t)} D( (X1 − X0),  v_θ(X_t, t) ),     X_t = t·X1 + (1 − t)·X0

with D = squared L2 (the paper) or pseudo-Huber (Lee et al. 2024, "Improving the Training of
Rectified Flows"). One-step distillation is the same objective at t = 0 only,
D(Z1, Z0 + v(Z0, 0)) = D(Z1 − Z0, v(Z0, 0)); k-step distillation evaluates it at t ∈ {0, 1/k, …, (k−1)/k}.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["interpolate", "loss_fn", "pseudo_huber", "sample_time", "squared_l2", "default_huber_c"]

UNIFORM_EPS = 1e-3  # the original code samples t ~ U(ε, 1)
U_SHAPED_A = 4.0
U_SHAPED_CLIP = 1e-5


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t·x1 + (1 − t)·x0 for ``x0, x1`` ``(B, *shape)`` and ``t`` ``(B,)``."""
    tb = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return x0 + tb * (x1 - x0)


def sample_time(kind: str, n: int, generator: torch.Generator, device: torch.device | str = "cpu", k: int | None = None) -> Tensor:
    """``n`` times from p(t), shape ``(n,)``.

    - ``uniform``: U(ε, 1), ε = 1e-3 (original code).
    - ``logit_normal``: t = sigmoid(n), n ~ N(0, 1) (Esser et al. 2024).
    - ``u_shaped``: p(t) ∝ cosh(a(t − ½)), a = 4 (rfpp's sampler): u ~ U(0, 1),
      t = −log(1 − u(1 − e^{−a}))/a, then t ← 1 − t with probability ½; clipped to [1e-5, 1 − 1e-5].
    - ``discrete``: uniform on {0, 1/k, …, (k−1)/k} (k-step distillation).
    """
    if kind == "uniform":
        t = UNIFORM_EPS + (1 - UNIFORM_EPS) * torch.rand(n, generator=generator)
    elif kind == "logit_normal":
        t = torch.sigmoid(torch.randn(n, generator=generator))
    elif kind == "u_shaped":
        a = U_SHAPED_A
        u = torch.rand(n, generator=generator)
        t = -torch.log1p(-u * (1 - math.exp(-a))) / a
        flip = torch.rand(n, generator=generator) < 0.5
        t = torch.where(flip, 1 - t, t).clamp(U_SHAPED_CLIP, 1 - U_SHAPED_CLIP)
    elif kind == "discrete":
        if not k or k < 1:
            raise ValueError("discrete time distribution needs k ≥ 1")
        t = torch.randint(0, k, (n,), generator=generator).float() / k
    else:
        raise ValueError(f"time_dist: unknown {kind!r}")
    return t.to(device)


def u_shaped_density(t: Tensor, a: float = U_SHAPED_A) -> Tensor:
    """Closed-form density of the (unclipped) U-shaped p(t) on [0, 1]: a·cosh(a(t−½)) / (2·sinh(a/2))."""
    return a * torch.cosh(a * (t - 0.5)) / (2 * math.sinh(a / 2))


def squared_l2(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error, shape ``(B,)`` (mean over dimensions)."""
    return (pred - target).pow(2).flatten(1).mean(1)


def default_huber_c(dim: int) -> float:
    """c = 0.00054·√D for data of D dimensions (iCT / rfpp; FIELD.md's "0.00054·D" scaled per √D)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-sample pseudo-Huber distance sqrt(‖pred − target‖² + c²) − c, shape ``(B,)``."""
    sq = (pred - target).pow(2).flatten(1).sum(1)
    return torch.sqrt(sq + c * c) - c


def loss_fn(kind: str, dim: int, c: float | None = None):
    """The batch loss E_B[D(pred, target)] as a function ``(pred, target) -> ()``.

    ``l2``: the mean of :func:`squared_l2` over the batch, which (every sample having the same D
    dimensions) is the mean over all elements: one fused kernel, forward and backward.
    ``pseudo_huber``: the mean of :func:`pseudo_huber`.
    """
    if kind == "l2":
        return torch.nn.functional.mse_loss
    if kind == "pseudo_huber":
        cc = default_huber_c(dim) if c is None else c
        return lambda pred, target: pseudo_huber(pred, target, cc).mean()
    raise ValueError(f"loss: unknown {kind!r}; expected 'l2' or 'pseudo_huber'")
