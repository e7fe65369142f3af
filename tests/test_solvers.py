"""Samplers against closed-form solutions of dz/dt = v(z, t)."""

from __future__ import annotations

import math

import pytest
import torch

from rectflow.solvers import solve, uniform_grid

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
