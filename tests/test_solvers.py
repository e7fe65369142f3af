"""Samplers against closed-form solutions of dz/dt = v(z, t)."""

from __future__ import annotations

import math

import pytest
import torch

from rectflow.solvers import invert, solve, uniform_grid

Z0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)


def const(c: float):
    return lambda z, t: torch.full_like(z, c)


def linear(a: float):
    return lambda z, t: a * z


@pytest.mark.parametrize("solver,per_step", [("euler", 1), ("heun", 2), ("midpoint", 2)])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_fixed_step_constant_field_is_exact(solver, per_step, steps):
    sol = solve(const(0.7), Z0, solver, steps)
    torch.testing.assert_close(sol.x, Z0 + 0.7)
    assert sol.nfe == per_step * steps


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_euler_linear_field_matches_discrete_closed_form(steps):
    a = -0.8
    sol = solve(linear(a), Z0, "euler", steps)
    torch.testing.assert_close(sol.x, Z0 * (1 + a / steps) ** steps)


@pytest.mark.parametrize("solver", ["heun", "midpoint"])
def test_second_order_linear_field(solver):
    a, n = 1.3, 8
    h = 1 / n
    sol = solve(linear(a), Z0, solver, n)
    torch.testing.assert_close(sol.x, Z0 * (1 + a * h + (a * h) ** 2 / 2) ** n)


def test_rk45_linear_field_matches_exponential():
    a = 1.5
    sol = solve(linear(a), Z0, "rk45", rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(sol.x, Z0 * math.exp(a), rtol=1e-6, atol=1e-6)
    assert sol.nfe > 6  # adaptive: measured, more than one stage


def test_rk45_constant_field_and_time_dependent_field():
    sol = solve(const(-1.25), Z0, "rk45")
    torch.testing.assert_close(sol.x, Z0 - 1.25)
    # dz/dt = 3t² -> z1 = z0 + 1
    sol = solve(lambda z, t: 3 * t[:, None] ** 2 * torch.ones_like(z), Z0, "rk45")
    torch.testing.assert_close(sol.x, Z0 + 1.0, rtol=1e-5, atol=1e-5)


def test_rk45_tolerance_controls_accuracy_and_cost():
    loose = solve(linear(2.0), Z0, "rk45", rtol=1e-3, atol=1e-3)
    tight = solve(linear(2.0), Z0, "rk45", rtol=1e-9, atol=1e-9)
    exact = Z0 * math.exp(2.0)
    assert (tight.x - exact).abs().max() < (loose.x - exact).abs().max()
    assert tight.nfe > loose.nfe


def test_trajectory_shapes_and_endpoints():
    sol = solve(const(1.0), Z0, "euler", 5, trajectory=True)
    assert sol.trajectory.shape == (6, *Z0.shape)
    torch.testing.assert_close(sol.trajectory[0], Z0)
    torch.testing.assert_close(sol.trajectory[-1], sol.x)
    torch.testing.assert_close(sol.times, uniform_grid(5).to(sol.times))


def test_custom_time_grid_is_used():
    times = torch.tensor([0.0, 0.1, 0.5, 1.0])
    sol = solve(lambda z, t: 2 * t[:, None] * torch.ones_like(z), Z0, "euler", times=times)
    # Euler on v = 2t: Σ 2 t_k h_k
    expected = 2 * (0.0 * 0.1 + 0.1 * 0.4 + 0.5 * 0.5)
    torch.testing.assert_close(sol.x, Z0 + expected)
    assert sol.nfe == 3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="solver"):
        solve(const(1.0), Z0, "rk4", 3)
    with pytest.raises(ValueError, match="steps"):
        solve(const(1.0), Z0, "euler", 0)
    with pytest.raises(ValueError, match="increasing"):
        solve(const(1.0), Z0, "euler", times=torch.tensor([0.0, 0.5, 0.4, 1.0]))



# ---- backwards: inversion (t: 1 → 0) ---------------------------------------------------------------


@pytest.mark.parametrize("solver,per_step", [("euler", 1), ("heun", 2), ("midpoint", 2)])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_forward_after_inverse_is_the_identity_for_a_constant_field(solver, per_step, steps):
    x1 = Z0 + 3.0
    inv = invert(const(0.7), x1, solver, steps)
    torch.testing.assert_close(inv.x, x1 - 0.7)  # exact at any NFE: a constant field is straight
    back = solve(const(0.7), inv.x, solver, steps)
    torch.testing.assert_close(back.x, x1)
    assert inv.nfe == back.nfe == per_step * steps  # NFE counted both ways


@pytest.mark.parametrize("steps", [1, 4, 50])
def test_euler_inversion_of_a_linear_field_matches_its_discrete_closed_form(steps):
    a = -0.8  # backwards, Euler multiplies by (1 − a/steps) each step
    torch.testing.assert_close(invert(linear(a), Z0, "euler", steps).x, Z0 * (1 - a / steps) ** steps)


@pytest.mark.parametrize("solver", ["heun", "midpoint"])
def test_second_order_inversion_of_a_linear_field(solver):
    a, n = 1.3, 8
    h = -1 / n
    torch.testing.assert_close(invert(linear(a), Z0, solver, n).x, Z0 * (1 + a * h + (a * h) ** 2 / 2) ** n)


def test_rk45_inverts_a_linear_field_to_tolerance_and_counts_its_evaluations():
    a = 1.5
    inv = invert(linear(a), Z0, "rk45", rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(inv.x, Z0 * math.exp(-a), rtol=1e-6, atol=1e-6)
    back = solve(linear(a), inv.x, "rk45", rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(back.x, Z0, rtol=1e-6, atol=1e-6)
    calls = []
    invert(lambda z, t: calls.append(float(t[0])) or a * z, Z0, "rk45", rtol=1e-8, atol=1e-8)
    assert len(calls) == inv.nfe > 6 and calls[0] == 1.0 and calls[-1] < 0.1  # starts at t = 1, runs down


def test_time_dependent_field_inverts_exactly_with_rk45():
    # dz/dt = 3t² from t = 1 to 0: z0 = z1 − 1
    v = lambda z, t: 3 * t[:, None] ** 2 * torch.ones_like(z)  # noqa: E731
    torch.testing.assert_close(invert(v, Z0, "rk45").x, Z0 - 1.0, rtol=1e-5, atol=1e-5)


def test_a_forward_grid_runs_backwards_and_the_velocity_sees_decreasing_times():
    seen: list[float] = []
    times = torch.tensor([0.0, 0.125, 0.5, 1.0])  # a BOSS-like increasing grid, reversed by invert
    sol = invert(lambda z, t: seen.append(float(t[0])) or 2 * t[:, None] * torch.ones_like(z), Z0, "euler", times=times)
    assert seen == [1.0, 0.5, 0.125]
    torch.testing.assert_close(sol.x, Z0 - 2 * (1.0 * 0.5 + 0.5 * 0.375 + 0.125 * 0.125))
    traj = invert(const(1.0), Z0, "euler", 4, trajectory=True)
    torch.testing.assert_close(traj.times, uniform_grid(4).flip(0).to(traj.times))
    torch.testing.assert_close(traj.trajectory[-1], Z0 - 1.0)


def test_a_decreasing_grid_is_an_inversion_and_a_zigzag_is_refused():
    sol = solve(const(2.0), Z0, "midpoint", times=torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(sol.x, Z0 - 2.0)
    with pytest.raises(ValueError, match="decreasing"):
        solve(const(1.0), Z0, "euler", times=torch.tensor([1.0, 0.5, 0.7, 0.0]))
