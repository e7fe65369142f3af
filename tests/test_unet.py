"""UNetVelocity: shapes, input validation, time dependence, gradient flow, zero-initialised output."""

from __future__ import annotations

import pytest
import torch

from rectflow.unet import UNetVelocity


def _randomise_output(net: UNetVelocity, seed: int = 0) -> None:
    """Give the zero-initialised last conv random weights so the output depends on everything else."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.conv_out.weight.copy_(0.1 * torch.randn(net.conv_out.weight.shape, generator=gen))


@pytest.mark.parametrize(
    ("shape", "mult", "attention"),
    [
        ((1, 8, 8), (1, 2), True),
        ((1, 8, 8), (1, 2, 2), False),
        ((3, 16, 16), (1, 2), True),
        ((3, 16, 16), (1, 2, 2), True),
        ((3, 32, 32), (1, 2, 2), True),
        ((2, 12, 20), (1, 2, 4), True),
    ],
)
def test_output_shape(shape: tuple[int, int, int], mult: tuple[int, ...], attention: bool) -> None:
    torch.manual_seed(0)
    net = UNetVelocity(shape, channels=8, channel_mult=mult, attention=attention, time_embed=16)
    x = torch.randn(3, *shape)
    out = net(x, torch.rand(3))
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert net(x, 0.5).shape == x.shape  # scalar t broadcasts


def test_rejects_wrong_rank() -> None:
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16)
    with pytest.raises(ValueError, match=r"rank-3"):
        net(torch.randn(4, 8, 8), torch.rand(4))


def test_rejects_channel_mismatch() -> None:
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16)
    with pytest.raises(ValueError, match=r"\(1, 8, 8\), got \(3, 8, 8\)"):
        net(torch.randn(4, 3, 8, 8), torch.rand(4))


def test_rejects_spatial_mismatch() -> None:
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16)
    with pytest.raises(ValueError, match=r"got \(1, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16), torch.rand(2))


@pytest.mark.parametrize(("shape", "mult"), [((1, 6, 8), (1, 2, 2)), ((3, 8, 10), (1, 2, 2, 2))])
def test_rejects_indivisible_size(shape: tuple[int, int, int], mult: tuple[int, ...]) -> None:
    factor = 2 ** (len(mult) - 1)
    with pytest.raises(ValueError, match=rf"divisible by 2\^\(levels-1\) = {factor}"):
        UNetVelocity(shape, channels=8, channel_mult=mult)


def test_rejects_bad_config_and_t_shape() -> None:
    with pytest.raises(ValueError, match=r"\(c, h, w\)"):
        UNetVelocity((8, 8), channels=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"even"):
        UNetVelocity((1, 8, 8), time_embed=15)
    with pytest.raises(ValueError, match=r"positive"):
        UNetVelocity((1, 8, 8), channel_mult=())
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \(4,\)"):
        net(torch.randn(4, 1, 8, 8), torch.rand(3))


def test_zero_initialised_output() -> None:
    torch.manual_seed(0)
    net = UNetVelocity((3, 16, 16), channels=8, channel_mult=(1, 2, 2), time_embed=16)
    out = net(torch.randn(5, 3, 16, 16), torch.rand(5))
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_t() -> None:
    torch.manual_seed(0)
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16)
    _randomise_output(net)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        a, b, c = net(x, 0.0), net(x, 0.5), net(x, torch.full((4,), 0.5))
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(b, c)  # scalar and per-sample t agree


def test_samples_are_independent() -> None:
    """Row i of the output depends only on row i of x and t (GroupNorm, attention are per sample)."""
    torch.manual_seed(0)
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16).eval()
    _randomise_output(net)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        full = net(x, t)
        single = torch.cat([net(x[i : i + 1], t[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    net = UNetVelocity((1, 8, 8), channels=8, channel_mult=(1, 2, 2), time_embed=16)
    x, t = torch.randn(6, 1, 8, 8), torch.rand(6)
    (net(x, t) - x).square().mean().backward()
    # At init the zero output conv blocks the gradient to every earlier layer; only it can move.
    assert net.conv_out.weight.grad is not None and net.conv_out.weight.grad.abs().sum() > 0
    assert net.conv_in.weight.grad is not None and net.conv_in.weight.grad.abs().sum() == 0
    _randomise_output(net)
    net.zero_grad()
    (net(x, t) - x).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_a_few_steps_reduce_the_loss() -> None:
    """Regress a fixed velocity field; the zero-initialised net must learn it quickly."""
    torch.manual_seed(0)
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, t = torch.randn(32, 1, 8, 8), torch.rand(32)
    target = -x * t[:, None, None, None]
    losses = []
    for _ in range(30):
        loss = (net(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_runs() -> None:
    torch.manual_seed(0)
    net = UNetVelocity((1, 8, 8), channels=8, time_embed=16)
    _randomise_output(net)
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), net(x, t), atol=5e-2, rtol=5e-2)
