"""Optimal K-step time grids for a trained flow: Bellman Optimal Stepsize Straightening (BOSS).

Nguyen et al. 2024, "Bellman Optimal Stepsize Straightening of Flow-Matching Models" (ICLR 2024).
Time convention as everywhere in rectflow: t = 0 is the source, t = 1 the target.

Method (FIELD.md, "Samplers")
-----------------------------
1. Run the teacher ``v`` with Euler on the uniform grid t_i = i / N, i = 0 … N (``grid_points`` = N
   steps, N + 1 states; N = 100 by default) from ``z0``, keeping the states x_i ``(B, *shape)`` and
   the velocities v_i = v(x_i, t_i) it evaluated (N evaluations in all; nothing is evaluated twice).
2. The cost of jumping from grid point j to grid point k > j with a single Euler step is::

       c_jk = mean_b ‖ x_j + (t_k − t_j) · v(x_j, t_j) − x_k ‖²        (sum over dimensions)

   i.e. how far one Euler step from the teacher's state at t_j lands from the teacher's state at
   t_k. c_{j,j+1} = 0 by construction; a straight flow has c_jk = 0 for every pair.
   With s = t_k − t_j, d = x_j − x_k it expands to mean(‖d‖²) + 2s·mean⟨v_j, d⟩ + s²·mean‖v_j‖², so
   the whole (N + 1) × (N + 1) matrix comes from three Gram matrices of the trajectory (float64),
   accumulated over batch chunks: memory is one chunk's trajectory, whatever the size of ``z0``.
3. Dynamic programming (Bellman): D_m(k) = min_{j<k} D_{m−1}(j) + c_jk with D_0(0) = 0 gives the
   K-step path 0 = i_0 < i_1 < … < i_K = N of least total cost Σ_m c_{i_{m−1} i_m} in O(K·N²);
   the schedule is t_{i_0}, …, t_{i_K}. The layers D_1, D_2, … do not depend on K, so one pass
   of N layers gives every K = 1 … N at once (:func:`bellman_paths`, O(N³)).

The result is an explicit time grid for :func:`rectflow.solvers.solve` (``times=``). A model's
schedules are stored beside it as ``models/NAME.schedule.json`` (:func:`save_schedule`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rectflow.io import atomic_write_json, read_json, require_file
from rectflow.solvers import Velocity, uniform_grid

__all__ = [
    "bellman_path",
    "bellman_paths",
    "bellman_schedule",
    "bellman_schedules",
    "load_schedule",
    "path_cost",
    "save_schedule",
    "schedule_path",
    "schedule_times",
    "step_costs",
]

SCHEDULE_FORMAT = 1


def step_costs(v: Velocity, z0: Tensor, grid_points: int = 100, chunk: int = 4096) -> Tensor:
    """The one-step cost matrix c ``(N + 1, N + 1)`` (float64, CPU) of ``v`` from ``z0`` ``(B, *shape)``.

    ``c[j, k]`` (j < k) is mean_b ‖x_j + (t_k − t_j)·v(x_j, t_j) − x_k‖² on the ``grid_points``-step
    uniform Euler trajectory; entries with j ≥ k are +inf. ``z0`` is processed ``chunk`` rows at a time.
    """
    if grid_points < 1:
        raise ValueError(f"grid_points: must be ≥ 1, got {grid_points}")
    if z0.shape[0] < 1:
        raise ValueError("z0: empty batch")
    n = grid_points
    ts = uniform_grid(n).tolist()
    t64 = torch.tensor(ts, dtype=torch.float64)
    gxx = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=z0.device)  # Σ_b ⟨x_j, x_k⟩
    gvx = torch.zeros(n, n + 1, dtype=torch.float64, device=z0.device)  # Σ_b ⟨v_j, x_k⟩
    gvv = torch.zeros(n, dtype=torch.float64, device=z0.device)  # Σ_b ‖v_j‖²
    total = z0.shape[0]
    with torch.inference_mode():
        for start in range(0, total, chunk):
            z = z0[start : start + chunk]
            b = z.shape[0]
            xs, vs = [z], []
            for t0, t1 in zip(ts[:-1], ts[1:]):
                vt = v(z, z.new_full((b,), t0))
                vs.append(vt)
                z = z + (t1 - t0) * vt  # exactly the solver's Euler update
                xs.append(z)
            x = torch.stack(xs).reshape(n + 1, -1).double()  # (N + 1, b·D)
            vv = torch.stack(vs).reshape(n, -1).double()  # (N, b·D)
            gxx += x @ x.T
            gvx += vv @ x.T
            gvv += vv.pow(2).sum(1)
    gxx, gvx, gvv = (g.cpu() / total for g in (gxx, gvx, gvv))
    diag = gxx.diagonal()
    dd = diag[:n, None] + diag[None, :] - 2 * gxx[:n]  # mean ‖x_j − x_k‖², (N, N + 1)
    vd = gvx.diagonal()[:, None] - gvx  # mean ⟨v_j, x_j − x_k⟩
    s = t64[None, :] - t64[:n, None]  # t_k − t_j
    c = (dd + 2 * s * vd + s.pow(2) * gvv[:, None]).clamp_min(0.0)
    out = torch.full((n + 1, n + 1), math.inf, dtype=torch.float64)
    upper = torch.triu(torch.ones(n, n + 1, dtype=torch.bool), diagonal=1)
    out[:n][upper] = c[upper]
    return out


def bellman_path(cost: Tensor, k: int) -> tuple[list[int], float]:
    """The K-step index path 0 = i_0 < … < i_K = N of least Σ cost[i_{m−1}, i_m], and that cost.

    ``cost`` ``(N + 1, N + 1)``: entries with j ≥ k are ignored (treated as +inf). Ties go to the
    smallest predecessor index, so the result is deterministic.
    """
    n = cost.shape[0] - 1
    if cost.ndim != 2 or cost.shape[1] != n + 1 or n < 1:
        raise ValueError(f"cost: expected a square (N + 1, N + 1) matrix, got {tuple(cost.shape)}")
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, {n}] for a {n}-step teacher grid, got {k}")
    c = cost.double().clone()
    c[~torch.triu(torch.ones(n + 1, n + 1, dtype=torch.bool), diagonal=1)] = math.inf
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    parents = []
    for _ in range(k):
        cand = best[:, None] + c  # (from j, to i)
        best, arg = cand.min(0)  # min returns the first index on ties
        parents.append(arg)
    if not math.isfinite(float(best[n])):
        raise ValueError("no finite K-step path: the cost matrix has infinite entries on every path")
    path = [n]
    for arg in reversed(parents):
        path.append(int(arg[path[-1]]))
    path.reverse()
    assert path[0] == 0 and all(a < b for a, b in zip(path[:-1], path[1:])), path
    return path, float(best[n])


def bellman_paths(cost: Tensor, ks: Iterable[int]) -> dict[int, tuple[list[int], float]]:
    """:func:`bellman_path` for several K in one pass: ``{K: (index path, cost)}``.

    The DP layer D_m (least cost of reaching each grid point in m steps) is the same whatever K,
    so layers 1 … max(ks) are computed once (O(max K · N²), not O(Σ K · N²)) and each K's path is
    read back from the parents of its own first K layers. Same ties as :func:`bellman_path`, hence
    the same paths.
    """
    n = cost.shape[0] - 1
    if cost.ndim != 2 or cost.shape[1] != n + 1 or n < 1:
        raise ValueError(f"cost: expected a square (N + 1, N + 1) matrix, got {tuple(cost.shape)}")
    wanted = sorted({int(k) for k in ks})
    for k in wanted:
        if not 1 <= k <= n:
            raise ValueError(f"k: must be in [1, {n}] for a {n}-step teacher grid, got {k}")
    if not wanted:
        return {}
    c = cost.double().clone()
    c[~torch.triu(torch.ones(n + 1, n + 1, dtype=torch.bool), diagonal=1)] = math.inf
    best = torch.full((n + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    parents: list[list[int]] = []
    out: dict[int, tuple[list[int], float]] = {}
    for m in range(1, wanted[-1] + 1):
        best, arg = (best[:, None] + c).min(0)  # (from j, to i); first index on ties
        parents.append(arg.tolist())
        if m in wanted:
            total = float(best[n])
            if not math.isfinite(total):
                raise ValueError("no finite K-step path: the cost matrix has infinite entries on every path")
            path = [n]
            for par in reversed(parents):
                path.append(par[path[-1]])
            path.reverse()
            assert path[0] == 0 and all(a < b for a, b in zip(path[:-1], path[1:])), path
            out[m] = (path, total)
    return out


def path_cost(cost: Tensor, path: Iterable[int]) -> float:
    """Σ cost[i_{m−1}, i_m] along an index path."""
    p = list(path)
    return float(sum(float(cost[a, b]) for a, b in zip(p[:-1], p[1:])))


def bellman_schedules(
    v: Velocity, z0: Tensor, ks: Iterable[int], grid_points: int = 100, chunk: int = 4096
) -> dict[int, Tensor]:
    """:func:`bellman_schedule` for several K from one teacher trajectory: ``{K: times (K + 1,)}``.

    One cost matrix (``grid_points`` evaluations of ``v`` on ``z0`` ``(B, *shape)``) and one DP pass
    (:func:`bellman_paths`) serve every K in ``ks``.
    """
    cost = step_costs(v, z0, grid_points, chunk)
    grid = uniform_grid(grid_points)
    return {k: grid[path].clone() for k, (path, _) in sorted(bellman_paths(cost, ks).items())}


def bellman_schedule(v: Velocity, z0: Tensor, k: int, grid_points: int = 100) -> Tensor:
    """The BOSS K-step time grid of the flow ``v`` from source samples ``z0`` ``(B, *shape)``.

    Runs ``v`` with Euler on the uniform ``grid_points``-step grid from ``z0`` (under
    ``torch.inference_mode``; ``grid_points`` evaluations of ``v``), builds
    c_jk = mean ‖x_j + (t_k − t_j)·v(x_j, t_j) − x_k‖² and returns the times ``(k + 1,)`` (float64,
    CPU) of the least-cost K-step path from t = 0 to t = 1, a subset of the uniform grid, strictly
    increasing (Nguyen et al. 2024). Use it as ``solve(v, z, "euler", times=schedule)``.
    """
    return bellman_schedules(v, z0, [k], grid_points)[k]


# ---- files ---------------------------------------------------------------------------------------


def schedule_path(stem: Path | str) -> Path:
    """``models/NAME.schedule.json`` for the model stem ``models/NAME`` (a ``.safetensors`` or
    ``.json`` suffix on ``stem`` is ignored)."""
    stem = Path(stem)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.parent / f"{stem.name}.schedule.json"


def _check_times(times: Any, k: int, where: str) -> Tensor:
    t = torch.as_tensor(times, dtype=torch.float64)
    if t.ndim != 1 or len(t) != k + 1:
        raise ValueError(f"{where}: schedule for K = {k} must have {k + 1} times, got shape {tuple(t.shape)}")
    if not (abs(float(t[0])) < 1e-9 and abs(float(t[-1]) - 1.0) < 1e-9):
        raise ValueError(f"{where}: schedule for K = {k} must run from 0 to 1, got {float(t[0])} … {float(t[-1])}")
    if not bool((t[1:] > t[:-1]).all()):
        raise ValueError(f"{where}: schedule for K = {k} is not strictly increasing")
    return t


def save_schedule(
    stem: Path | str, times_by_k: dict[int, Any], meta: dict[str, Any] | None = None
) -> Path:
    """Write ``{K: times}`` atomically to ``models/NAME.schedule.json``; returns the path.

    File: ``{"format": 1, "method": "bellman", "schedules": {"K": [t_0, …, t_K]}, "meta": {...}}``.
    Every grid is checked (K + 1 strictly increasing times from 0 to 1) before anything is written.
    """
    path = schedule_path(stem)
    scheds = {}
    for k in sorted(times_by_k):
        t = _check_times(times_by_k[k], int(k), str(path))
        scheds[str(int(k))] = [float(x) for x in t.tolist()]
    doc = {"format": SCHEDULE_FORMAT, "method": "bellman", "schedules": scheds, "meta": dict(meta or {})}
    atomic_write_json(path, doc)
    return path


def load_schedule(stem: Path | str) -> dict[int, Tensor]:
    """Read ``models/NAME.schedule.json``: ``{K: times (K + 1,) float64}``.

    Raises :class:`rectflow.nets.ModelError` naming the file if it is missing or malformed.
    """
    from rectflow.nets import ModelError

    path = schedule_path(stem)
    require_file(path, ModelError, f"{path}: no step schedule (make one with rectflow.schedule.bellman_schedule)")
    try:
        doc = read_json(path)
        raw = doc["schedules"]
        return {int(k): _check_times(t, int(k), str(path)) for k, t in raw.items()}
    except ModelError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{path}: not a valid schedule file ({e})") from None


def schedule_times(stem: Path | str, k: int, model_sha256: str | None = None) -> Tensor:
    """The saved BOSS K-step grid ``(k + 1,)`` float64 of the model ``models/NAME`` (``stem``).

    With ``model_sha256`` (the weights' hash from the model card), a file made for other weights
    (its ``meta.model_sha256`` differs) is refused: the schedule belongs to one trained flow.
    Raises :class:`rectflow.nets.ModelError` naming the file if it is missing, malformed, stale or
    has no schedule for this K.
    """
    from rectflow.nets import ModelError

    scheds = load_schedule(stem)
    if model_sha256 is not None:
        try:
            made_for = (read_json(schedule_path(stem)).get("meta") or {}).get("model_sha256")
        except (OSError, ValueError, AttributeError):
            made_for = None
        if made_for is not None and made_for != model_sha256:
            raise ModelError(f"{schedule_path(stem)}: made for other weights (sha256 {str(made_for)[:12]}…, the "
                             f"model's is {model_sha256[:12]}…); rerun the stage that trained it")
    if int(k) not in scheds:
        have = sorted(scheds)
        span = f"K = {have[0]} … {have[-1]}" if have else "no K at all"
        raise ModelError(f"{schedule_path(stem)}: no schedule for K = {int(k)} (it has {span})")
    return scheds[int(k)]
