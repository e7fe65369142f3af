"""Sample-quality and path metrics (FIELD.md, "Metrics").

- :func:`w2`: 2-Wasserstein distance between two empirical sets by exact OT (POT ``emd2`` with
  squared-Euclidean cost, uniform weights): W2 = sqrt(min_π Σ π_ij ‖a_i − b_j‖²).
- :func:`mmd`: RBF-kernel maximum mean discrepancy (biased V-statistic, MMD², reported as MMD).
- :func:`straightness`: S(Z) = ∫₀¹ E‖(Z1 − Z0) − v(Z_t, t)‖² dt on an N-step Euler trajectory
  (Liu et al. 2022, eq. 6); 0 iff one Euler step is exact.
- :func:`transport_cost`: E‖Z1 − Z0‖².
- :func:`latency_ms`: wall time per generated sample at a fixed batch size.
- :func:`reconstruction`: invert held-out x1 (t: 1 → 0), regenerate (0 → 1) with the same solver
  and steps; MSE = mean over rows and dimensions of (x1 − x̂1)², PSNR = 10·log10(range² / MSE).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rectflow.solvers import Velocity, invert, solve, uniform_grid

__all__ = ["latency_ms", "mmd", "reconstruction", "straightness", "transport_cost", "w2"]


def _flat(x: Tensor | np.ndarray) -> np.ndarray:
    arr = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    return arr.reshape(len(arr), -1).astype(np.float64)


def w2(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Exact W2 between the empirical measures of ``a`` ``(n, *shape)`` and ``b`` ``(m, *shape)``."""
    import ot

    x, y = _flat(a), _flat(b)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"w2: dimensions differ ({x.shape[1]} vs {y.shape[1]})")
    cost = ot.dist(x, y)  # squared Euclidean
    val = ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), cost, numItermax=10_000_000)
    return float(np.sqrt(max(float(val), 0.0)))


def mmd(a: Tensor | np.ndarray, b: Tensor | np.ndarray, bandwidth: float | None = None) -> float:
    """RBF MMD (square root of the biased MMD²), bandwidth by the median heuristic when None."""
    x = torch.from_numpy(_flat(a))
    y = torch.from_numpy(_flat(b))
    if bandwidth is None:
        z = torch.cat([x, y])
        sub = z[torch.randperm(len(z), generator=torch.Generator().manual_seed(0))[:2000]]
        d = torch.cdist(sub, sub).pow(2)
        bandwidth = float(torch.sqrt(d[d > 0].median() / 2)) if (d > 0).any() else 1.0
    gamma = 1.0 / (2 * bandwidth**2)

    def k(p: Tensor, q: Tensor) -> Tensor:
        return torch.exp(-gamma * torch.cdist(p, q).pow(2)).mean()

    val = k(x, x) + k(y, y) - 2 * k(x, y)
    return float(torch.sqrt(val.clamp_min(0)))


def straightness(v: Velocity, z0: Tensor, steps: int = 100) -> float:
    """S(Z) on an ``steps``-step Euler trajectory from ``z0`` ``(B, *shape)``; sum over dims, mean over B."""
    times = uniform_grid(steps, z0.device)
    ts = times.tolist()
    z = z0
    vs = []
    for t0, t1 in zip(ts[:-1], ts[1:]):
        vt = v(z, z.new_full((z.shape[0],), t0))
        vs.append(vt)
        z = z + (t1 - t0) * vt
    return straightness_of(z0, z, vs)


class VelocityRecorder:
    """A velocity that keeps every output it returns, in order (``vs``: a solver's velocities), with the
    attributes the solvers read (``forwards``: network forwards per call; ``average_velocity``), so
    that :func:`straightness_of` can score a trajectory that a solve made for another reason.

    ``VelocityRecorder(v)(z, t, *rest) -> v(z, t, *rest)``: ``z: (B, *shape)``, ``t: (B,)``."""

    def __init__(self, v: Callable[..., Tensor]) -> None:
        self.v = v
        self.vs: list[Tensor] = []
        self.forwards = int(getattr(v, "forwards", 1))
        self.average_velocity = bool(getattr(v, "average_velocity", False))

    def __call__(self, z: Tensor, t: Tensor, *rest: Any) -> Tensor:
        out = self.v(z, t, *rest)
        self.vs.append(out)
        return out


def straightness_of(z0: Tensor, z1: Tensor, velocities: list[Tensor]) -> float:
    """S(Z) = mean over the uniform grid's steps of E‖(Z1 − Z0) − v(Z_t, t)‖² (sum over dims, mean
    over B) from a uniform Euler trajectory's ends ``z0``, ``z1`` ``(B, *shape)`` and its ``steps``
    velocities ``(B, *shape)`` each: what :func:`straightness` computes, for a trajectory that an
    Euler solve already made (the same arithmetic, so the same bits)."""
    disp = z1 - z0
    total = torch.zeros((), dtype=torch.float64, device=z0.device)
    for vt in velocities:  # uniform grid: the integral is the mean over steps
        total += (disp - vt).pow(2).flatten(1).sum(1).double().mean()
    return float(total / len(velocities))


def transport_cost(z0: Tensor, z1: Tensor) -> float:
    """E‖Z1 − Z0‖² (sum over dimensions, mean over samples)."""
    return float((z1 - z0).pow(2).flatten(1).sum(1).double().mean())


def latency_ms(fn: Callable[[], object], batch: int, repeats: int = 3, warmup: int = 1,
               long_s: float = 1.0) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` (which generates ``batch`` samples), per sample, in ms.

    A call of ``long_s`` seconds or more is timed once, its first call (a 100-step or adaptive
    solve: its warm-up is its first of many forwards, and repeating it would cost evaluate more than
    the samples it scores); shorter ones get ``warmup`` untimed calls, then ``repeats`` timed ones.
    """
    def once() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = once()
    if first >= long_s:
        return first * 1000.0 / batch
    for _ in range(warmup - 1):
        fn()
    best = min(once() for _ in range(repeats))
    return best * 1000.0 / batch


def reconstruction(
    v: Velocity, x1: Tensor, solver: str, steps: int | None, *, rtol: float = 1e-5, atol: float = 1e-5,
    data_range: float | None = None,
) -> dict[str, float | int]:
    """Invert ``x1`` ``(n, *shape)`` to x0 and regenerate it, both with ``solver`` at ``steps``
    (None for rk45); returns ``mse`` (per dimension), ``nfe`` (evaluations of one direction, the
    larger for rk45), ``nfe_total`` (both) and, with ``data_range`` (2 for images in [−1, 1]),
    ``psnr`` in dB. Straight flows reconstruct exactly at any NFE; a curved one pays twice."""
    back = invert(v, x1, solver, steps, rtol=rtol, atol=atol)
    fwd = solve(v, back.x, solver, steps, rtol=rtol, atol=atol)
    mse = float(((fwd.x.double() - x1.double()) ** 2).mean())
    out: dict[str, float | int] = {"mse": mse, "nfe": max(back.nfe, fwd.nfe), "nfe_total": back.nfe + fwd.nfe}
    if data_range is not None:
        out["psnr"] = float(10 * np.log10(data_range**2 / max(mse, 1e-30)))
    return out
