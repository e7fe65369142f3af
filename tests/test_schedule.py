"""BOSS step schedules (rectflow.schedule) against closed forms and brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from rectflow.nets import ModelError
from rectflow.schedule import (
    bellman_path,
    bellman_paths,
    bellman_schedule,
    bellman_schedules,
    load_schedule,
    path_cost,
    save_schedule,
    schedule_path,
    schedule_times,
    step_costs,
)
from rectflow.solvers import solve, uniform_grid

Z0 = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def constant(z, t):
    return torch.full_like(z, 0.5) + torch.tensor([0.0, -1.5], dtype=z.dtype)


def rotating(z, t, lo=0.4, hi=0.6, omega=8.0):
    """Rotation about the origin at angular speed ω for t in [lo, hi), still elsewhere."""
    on = ((t >= lo) & (t < hi)).to(z.dtype)[:, None]
    rot = torch.stack([-z[:, 1], z[:, 0]], 1)
    return omega * on * rot


def valid(times: torch.Tensor, k: int) -> None:
    assert times.shape == (k + 1,)
    assert times[0] == 0.0 and times[-1] == 1.0
    assert bool((times[1:] > times[:-1]).all())


def test_cost_matrix_definition_matches_direct_computation():
    def curvy(z, t):
        return torch.stack([torch.sin(3 * z[:, 1] + 2 * t), z[:, 0] * t], 1)

    n = 10
    c = step_costs(curvy, Z0, n, chunk=100)  # several chunks
    sol = solve(curvy, Z0, "euler", n, trajectory=True)
    xs, ts = sol.trajectory, uniform_grid(n)
    for j, k in [(0, 1), (0, 10), (3, 7), (9, 10), (2, 5)]:
        pred = xs[j] + (ts[k] - ts[j]) * curvy(xs[j], torch.full((len(Z0),), float(ts[j]), dtype=Z0.dtype))
        direct = (pred - xs[k]).pow(2).sum(1).mean()
        assert float(c[j, k]) == pytest.approx(float(direct), rel=1e-9, abs=1e-12)
    assert torch.isinf(c[5, 5]) and torch.isinf(c[6, 2])
    assert float(c.diagonal(1).abs().max()) < 1e-12  # one Euler step reproduces the next state exactly


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_straight_field_every_schedule_costs_nothing(k):
    c = step_costs(constant, Z0, 100)
    finite = c[torch.isfinite(c)]
    assert float(finite.abs().max()) < 1e-10
    times = bellman_schedule(constant, Z0, k)
    valid(times, k)
    assert set(times.tolist()) <= set(uniform_grid(100).tolist())
    path, total = bellman_path(c, k)
    assert total < 1e-10 and len(path) == k + 1


def test_curvature_in_a_known_interval_attracts_the_grid():
    k = 4
    times = bellman_schedule(rotating, Z0, k)
    valid(times, k)
    interior = times[1:-1]
    assert bool(((interior >= 0.4 - 1e-9) & (interior <= 0.6 + 1e-9)).all()), times
    # and it beats the uniform 4-step grid by far on the final samples
    ref = solve(rotating, Z0, "euler", 100).x
    err_opt = (solve(rotating, Z0, "euler", times=times).x - ref).pow(2).sum(1).mean()
    err_uni = (solve(rotating, Z0, "euler", k).x - ref).pow(2).sum(1).mean()
    assert float(err_opt) < 0.5 * float(err_uni)


def test_dp_matches_brute_force_on_a_small_grid():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()

    def field(z, t):
        return 3 * net(torch.cat([z, t[:, None]], 1))

    n, k = 7, 3  # 8 grid points, 3 steps
    c = step_costs(field, Z0, n)
    path, total = bellman_path(c, k)
    brute = min(
        (path_cost(c, (0, *mid, n)), (0, *mid, n)) for mid in itertools.combinations(range(1, n), k - 1)
    )
    assert total == pytest.approx(brute[0], rel=1e-12, abs=1e-15)
    assert tuple(path) == brute[1]
    assert path_cost(c, path) == pytest.approx(total)
    # every k from 1 to n: the DP is never worse than any sampled path, and k = n is the full grid
    for kk in range(1, n + 1):
        p, tot = bellman_path(c, kk)
        for mid in itertools.combinations(range(1, n), kk - 1):
            assert tot <= path_cost(c, (0, *mid, n)) + 1e-12
    assert bellman_path(c, n)[0] == list(range(n + 1))


def test_bad_arguments():
    c = step_costs(constant, Z0, 5)
    with pytest.raises(ValueError, match="k"):
        bellman_path(c, 0)
    with pytest.raises(ValueError, match="k"):
        bellman_path(c, 6)
    with pytest.raises(ValueError, match="grid_points"):
        step_costs(constant, Z0, 0)


def test_save_load_round_trip(tmp_path):
    stem = tmp_path / "models" / "rf2"
    scheds = bellman_schedules(rotating, Z0, [2, 4], grid_points=50)
    path = save_schedule(stem, {k: t.tolist() for k, t in scheds.items()}, meta={"grid_points": 50})
    assert path == tmp_path / "models" / "rf2.schedule.json"
    assert schedule_path(stem.with_suffix(".safetensors")) == path
    back = load_schedule(stem)
    assert sorted(back) == [2, 4]
    for k in (2, 4):
        torch.testing.assert_close(back[k], scheds[k])
    assert not list(path.parent.glob(".*.tmp"))  # atomic: no temporary left behind


def test_save_rejects_bad_grids_and_load_names_the_file(tmp_path):
    stem = tmp_path / "m"
    with pytest.raises(ValueError, match="increasing"):
        save_schedule(stem, {3: [0.0, 0.7, 0.5, 1.0]})
    with pytest.raises(ValueError, match="3 times"):
        save_schedule(stem, {2: [0.0, 1.0]})
    assert not schedule_path(stem).exists()
    with pytest.raises(ModelError, match="m.schedule.json"):
        load_schedule(stem)
    schedule_path(stem).write_text('{"schedules": {"2": [0, 0.9, 0.5]}}')
    with pytest.raises(ModelError, match="not a valid schedule"):
        load_schedule(stem)
    schedule_path(stem).write_text("not json")
    with pytest.raises(ModelError, match="not a valid schedule"):
        load_schedule(stem)


def test_inference_mode_and_float32_model():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 2))

    def field(z, t):
        return net(torch.cat([z, t[:, None]], 1))

    z = Z0.float()
    times = bellman_schedule(field, z, 3, grid_points=20)
    valid(times, 3)
    assert times.dtype == torch.float64 and not times.requires_grad


def test_one_pass_dp_equals_the_per_k_dp():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()

    def field(z, t):
        return 3 * net(torch.cat([z, t[:, None]], 1))

    n = 40
    c = step_costs(field, Z0, n)
    every = bellman_paths(c, range(1, n + 1))
    assert sorted(every) == list(range(1, n + 1))
    for k in range(1, n + 1):
        path, total = bellman_path(c, k)
        assert every[k][0] == path and every[k][1] == pytest.approx(total, rel=1e-12, abs=1e-15)
    assert bellman_paths(c, [5, 2]) == {2: every[2], 5: every[5]}
    with pytest.raises(ValueError, match="k"):
        bellman_paths(c, [3, n + 1])
    # bellman_schedules reads its grids off the same single pass
    scheds = bellman_schedules(field, Z0, [1, 7, n], grid_points=n)
    grid = uniform_grid(n)
    for k in (1, 7, n):
        torch.testing.assert_close(scheds[k], grid[every[k][0]])


def test_schedule_times_names_the_file_for_a_missing_k_or_other_weights(tmp_path):
    stem = tmp_path / "rf1"
    save_schedule(stem, {1: [0.0, 1.0], 2: [0.0, 0.3, 1.0]}, meta={"model_sha256": "a" * 64})
    torch.testing.assert_close(schedule_times(stem, 2, "a" * 64), torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64))
    with pytest.raises(ModelError, match=r"rf1.schedule.json: no schedule for K = 4 \(it has K = 1 … 2\)"):
        schedule_times(stem, 4)
    with pytest.raises(ModelError, match="rf1.schedule.json: made for other weights"):
        schedule_times(stem, 2, "b" * 64)
    with pytest.raises(ModelError, match="nothing.schedule.json: no step schedule"):
        schedule_times(tmp_path / "nothing", 2)
