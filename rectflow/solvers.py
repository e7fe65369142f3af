"""ODE samplers for dz/dt = v(z, t), integrated from t = 0 (source) to t = 1 (target), or backwards.

Every sampler returns a :class:`Solution` with the samples and the number of velocity evaluations
it actually made (NFE), counted at the call site, never assumed, in forwards of the network per
sample (a guided velocity that runs both branches counts two per evaluation). Fixed-step samplers take either a
step count (uniform grid) or an explicit time grid (e.g. a BOSS schedule). A grid may decrease:
``reverse=True`` (or a decreasing ``times``) integrates t: 1 → 0, which inverts the flow (x1 → x0,
:func:`invert`); every formula below holds with a negative step h. The midpoint step is
RF-Solver's second-order step (its finite-difference time derivative at the half step makes it the
explicit midpoint method), so ``midpoint`` is the inversion sampler of "Taming Rectified Flow".

- Euler:    z ← z + h·v(z, t)                                   (1 NFE per step)
- Heun:     z̃ = z + h·v(z, t);  z ← z + h/2·(v(z, t) + v(z̃, t + h))   (2 NFE per step)
- Midpoint: z ← z + h·v(z + h/2·v(z, t), t + h/2)               (2 NFE per step)
- RK45:     adaptive Dormand–Prince (torchdiffeq ``dopri5``), rtol/atol settable.

An average-velocity network (MeanFlow: ``average_velocity`` true, called ``u(z, t, end)``) takes
Euler's forward steps as z ← z + h·u(z, t, t + h), exact for the flow it learned at any step count;
every other step and solver uses its instantaneous velocity u(z, t, t) = v(z, t).

The loops do no host synchronisation per step (no ``.item()``); call them under
``torch.inference_mode()`` when no gradient is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SOLVERS", "Solution", "Velocity", "invert", "solve", "uniform_grid"]

Velocity = Callable[[Tensor, Tensor], Tensor]
"""v(z, t): ``z`` ``(B, *shape)``, ``t`` ``(B,)`` -> ``(B, *shape)``."""

SOLVERS = ("euler", "heun", "midpoint", "rk45")
_NFE_PER_STEP = {"euler": 1, "heun": 2, "midpoint": 2}


@dataclass
class Solution:
    """``x``: the state at the grid's last time (t = 1 forwards, t = 0 inverted), ``(B, *shape)``;
    ``nfe``: velocity evaluations made;
    ``trajectory``: ``(T, B, *shape)`` states at ``times`` ``(T,)`` when requested."""

    x: Tensor
    nfe: int
    trajectory: Tensor | None = None
    times: Tensor | None = None


class _Counted:
    """Wraps a velocity so that every evaluation is counted (host-side integer, no sync), in
    forwards of the network per sample: a velocity with a ``forwards`` attribute (classifier-free
    guidance, :class:`rectflow.guidance.Guided`: 2 when both branches run) counts that many.

    ``average``: ``v`` is an average-velocity network u(z, t, end) (MeanFlow, its
    ``average_velocity`` attribute true), called with ``end`` on forward Euler steps."""

    def __init__(self, v: Velocity) -> None:
        self.v, self.n = v, 0
        self.average = bool(getattr(v, "average_velocity", False))
        self.forwards = int(getattr(v, "forwards", 1))

    def __call__(self, z: Tensor, t: Tensor, end: Tensor | None = None) -> Tensor:
        self.n += self.forwards
        return self.v(z, t) if end is None else self.v(z, t, end)  # type: ignore[call-arg]


def uniform_grid(steps: int, device: torch.device | str = "cpu", reverse: bool = False) -> Tensor:
    """``steps + 1`` points 0 = t_0 < … < t_K = 1, shape ``(steps + 1,)``; ``reverse``: 1 → 0."""
    if steps < 1:
        raise ValueError(f"steps: must be ≥ 1, got {steps}")
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64, device=device)
    return grid.flip(0) if reverse else grid


def _check_grid(times: Tensor) -> Tensor:
    """``times`` if it is a 1-D strictly monotone grid (increasing or decreasing), else ValueError."""
    if times.ndim != 1 or len(times) < 2:
        raise ValueError(f"times: expected a 1-D grid of ≥ 2 points, got shape {tuple(times.shape)}")
    d = times[1:] - times[:-1]
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise ValueError("times: the grid must be strictly increasing (sampling) or strictly decreasing (inversion)")
    return times


def _fixed(
    method: str, v: _Counted, z: Tensor, times: Tensor, keep: bool
) -> tuple[Tensor, list[Tensor] | None]:
    b = z.shape[0]
    traj = [z] if keep else None
    # One host transfer of the grid up front; the loop itself never synchronises.
    ts = times.double().cpu().tolist()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        h = t1 - t0
        tt = z.new_full((b,), t0)
        # An average-velocity network steps exactly by its mean over [t0, t1]: z1 = z0 + h·u(z0, t0, t1)
        # (MeanFlow's k-step sampler), forwards only (it is trained on s ≤ e).
        v0 = v(z, tt, z.new_full((b,), t1)) if v.average and method == "euler" and h > 0 else v(z, tt)
        if method == "euler":
            z = z + h * v0
        elif method == "heun":
            z_pred = z + h * v0
            z = z + (0.5 * h) * (v0 + v(z_pred, z.new_full((b,), t1)))
        elif method == "midpoint":
            z = z + h * v(z + (0.5 * h) * v0, z.new_full((b,), t0 + 0.5 * h))
        if traj is not None:
            traj.append(z)
    return z, traj


def solve(
    v: Velocity,
    z0: Tensor,
    solver: str = "euler",
    steps: int | None = None,
    *,
    times: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trajectory: bool = False,
    reverse: bool = False,
) -> Solution:
    """Integrate ``dz/dt = v(z, t)`` from ``z0`` ``(B, *shape)`` at t = 0 to t = 1 (``reverse``:
    from t = 1 to t = 0, ``z0`` then being the state at t = 1).

    Fixed-step solvers use ``times`` if given (increasing, or decreasing to invert; ``reverse``
    then flips an increasing grid such as a saved BOSS schedule), else ``steps`` uniform steps.
    ``rk45`` is adaptive; with ``trajectory`` it also reports states at ``times`` (default: 101
    uniform points).
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver: unknown {solver!r}; expected one of {list(SOLVERS)}")
    if times is not None and reverse and len(times) > 1 and bool(times[-1] > times[0]):
        times = times.flip(0)
    counted = _Counted(v)
    if solver == "rk45":
        from torchdiffeq import odeint

        out_t = times if times is not None else (uniform_grid(100, z0.device, reverse) if trajectory else None)
        ends = [1.0, 0.0] if reverse else [0.0, 1.0]
        grid = torch.tensor(ends, device=z0.device, dtype=z0.dtype) if out_t is None else _check_grid(out_t).to(z0.dtype)
        b = z0.shape[0]

        def f(t: Tensor, z: Tensor) -> Tensor:
            return counted(z, t.expand(b))

        # dopri5 is FSAL: odeint makes exactly the evaluations counted here (plus its initial-step probe).
        try:
            zs = odeint(f, z0, grid, rtol=rtol, atol=atol, method="dopri5")
        except AssertionError as e:  # torchdiffeq's "underflow in dt": a NaN/inf or exploding velocity
            from rectflow.errors import RunFailedError

            raise RunFailedError(f"rk45: the step size underflowed ({' '.join(str(e).split())[:100]}): the velocity "
                                 f"field is NaN, infinite or explodes at rtol {rtol:g}, atol {atol:g}") from None
        return Solution(zs[-1], counted.n, zs if trajectory else None, grid if trajectory else None)
    if times is None:
        if steps is None:
            raise ValueError(f"solver {solver!r}: give steps or times")
        times = uniform_grid(steps, z0.device, reverse)
    times = _check_grid(times)
    z, traj = _fixed(solver, counted, z0, times, trajectory)
    expected = _NFE_PER_STEP[solver] * (len(times) - 1) * counted.forwards
    assert counted.n == expected, (counted.n, expected)
    return Solution(z, counted.n, torch.stack(traj) if traj is not None else None, times if trajectory else None)


def invert(
    v: Velocity,
    x1: Tensor,
    solver: str = "midpoint",
    steps: int | None = None,
    *,
    times: Tensor | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trajectory: bool = False,
) -> Solution:
    """Inversion x1 → x0: integrate ``dz/dt = v(z, t)`` from t = 1 back to t = 0.

    ``x1`` ``(B, *shape)``: states at t = 1 (data); returns the states at t = 0 (for a flow from
    noise, the noise that regenerates them). ``times`` may be the forward grid (a BOSS schedule,
    increasing): it is run backwards. Reconstruction ``solve(v, invert(v, x1).x)`` returns x1 up
    to the two solvers' discretisation errors, which vanish for a straight flow.
    """
    return solve(v, x1, solver, steps, times=times, rtol=rtol, atol=atol, trajectory=trajectory, reverse=True)
