"""Classifier-free guidance against closed forms (rectflow.guidance), label dropout, labelled shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rectflow.guidance import Guided, GuidanceError, drop_labels
from rectflow.nets import build_model
from rectflow.pairs import PairStream, read_shard, write_shard
from rectflow.solvers import solve


class Constructed(nn.Module):
    """v(x, t, y) = a_y · x + t, v(x, t, ∅) = b · x (closed form: every branch known exactly)."""

    classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([2.0, -1.0, 0.5, 0.0]))  # index 3 = ∅ (unused: b)
        self.b = 0.25
        self.calls: list[int] = []

    def forward(self, x: Tensor, t: Tensor, *, y: Tensor | None = None) -> Tensor:
        self.calls.append(x.shape[0])
        if y is None:
            return self.b * x
        cond = self.a[y].reshape(-1, 1) * x + t.reshape(-1, 1)
        return torch.where((y == self.classes).reshape(-1, 1), self.b * x, cond)


def test_w0_is_the_unconditional_and_w1_the_conditional_velocity_exactly() -> None:
    net = Constructed()
    x, t, y = torch.randn(6, 2), torch.rand(6), torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(Guided(net, y, 0.0)(x, t), net(x, t))
    assert torch.equal(Guided(net, y, 1.0)(x, t), net(x, t, y=y))
    w = 3.0
    expected = net(x, t) + w * (net(x, t, y=y) - net(x, t))
    assert torch.allclose(Guided(net, y, w)(x, t), expected, atol=1e-6)


def test_guided_runs_both_branches_in_one_batched_forward_and_counts_two_nfe() -> None:
    net = Constructed()
    y = torch.tensor([0, 1, 2, 1])
    net.calls.clear()
    sol = solve(Guided(net, y, 2.0), torch.randn(4, 2), "euler", 10)
    assert net.calls == [8] * 10  # 2B rows per forward, one forward per step
    assert sol.nfe == 20  # forwards of the network per sample
    assert solve(Guided(net, y, 1.0), torch.randn(4, 2), "heun", 5).nfe == 10
    assert solve(Guided(net, y, 0.0), torch.randn(4, 2), "midpoint", 5, reverse=True).nfe == 10


def test_guided_rk45_counts_forwards() -> None:
    net = Constructed()
    y = torch.tensor([0, 1])
    net.calls.clear()
    sol = solve(Guided(net, y, 2.0), torch.randn(2, 2), "rk45", rtol=1e-4, atol=1e-4)
    assert sol.nfe == 2 * len(net.calls)


def test_negative_guidance_is_refused() -> None:
    with pytest.raises(GuidanceError, match="w must be ≥ 0"):
        Guided(Constructed(), torch.tensor([0]), -0.5)


def test_label_dropout_rate_and_determinism() -> None:
    y = torch.zeros(200_000, dtype=torch.long)
    out = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    rate = float((out == 10).float().mean())
    assert abs(rate - 0.1) < 0.003  # 200k draws: std of the rate 0.00067
    assert set(out.unique().tolist()) == {0, 10}
    again = drop_labels(y, 0.1, 10, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert drop_labels(y, 0.0, 10, torch.Generator()) is y


@pytest.mark.parametrize("arch", [
    {"kind": "mlp", "shape": [2], "hidden": 16, "depth": 2, "time_embed": 8},
    {"kind": "unet", "shape": [1, 8, 8], "channels": 8, "channel_mult": [1, 2], "attention": False, "time_embed": 8},
])
def test_conditional_networks_null_class_and_unconditional_refusal(arch: dict) -> None:
    torch.manual_seed(0)
    plain = build_model(arch)
    cond = build_model(arch | {"classes": 4})
    x = torch.randn(3, *arch["shape"])
    # y=None is the null class ∅ = index K, whose embedding starts at zero
    assert torch.equal(cond(x, 0.3), cond(x, 0.3, y=torch.full((3,), 4)))
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, 0.3, y=torch.zeros(3, dtype=torch.long))
    # an unconditional architecture is unchanged: same parameter names and shapes as before
    assert "cond.label.table.weight" in dict(cond.named_parameters())
    assert not any(k.startswith("cond") for k in plain.state_dict())


def test_guidance_input_network_takes_w() -> None:
    arch = {"kind": "mlp", "shape": [2], "hidden": 16, "depth": 2, "time_embed": 8, "classes": 3,
            "guidance_input": True}
    net = build_model(arch)
    x, y = torch.randn(5, 2), torch.tensor([0, 1, 2, 0, 1])
    # the scale's output layer starts at zero: the same field for every w until trained
    assert torch.equal(net(x, 0.5, y=y, w=1.0), net(x, 0.5, y=y, w=3.0))
    with torch.no_grad():
        net.cond.scale[1].weight.normal_()
    a, b = net(x, 0.5, y=y, w=1.0), net(x, 0.5, y=y, w=3.0)
    assert not torch.equal(a, b)
    g = Guided(net, y, 3.0)
    assert g.forwards == 1 and torch.equal(g(x, torch.full((5,), 0.5)), b)


def test_shards_round_trip_labels_bit_for_bit_and_stream_them_aligned(tmp_path: Path) -> None:
    import json

    rng = np.random.default_rng(0)
    entries, all_y = [], []
    for i in range(3):
        z0 = rng.standard_normal((50, 2)).astype(np.float32)
        y = rng.integers(0, 8, 50)
        z1 = z0 + y[:, None].astype(np.float32)  # z1 − z0 encodes the label: alignment is checkable
        entries.append(write_shard(tmp_path, i, z0, z1, y=y))
        got = read_shard(tmp_path, entries[-1], (2,), labels=("y",))
        assert np.array_equal(got[0], z0) and np.array_equal(got[1], z1) and np.array_equal(got[2], y)
        assert got[2].dtype == np.int64
        all_y.append(y)
    man = {"format": 1, "round": 1, "shape": [2], "dim": 2, "n_pairs": 150, "shard_size": 50, "complete": True,
           "labels": {"classes": 8, "draw": "uniform", "guidance": 1.0, "column": "y"}, "shards": entries}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    stream = PairStream(tmp_path, seed=0)
    x0, x1, y = stream.next_batch(150)
    assert torch.equal((x1 - x0)[:, 0].round().long(), y)
    assert sorted(y.tolist()) == sorted(np.concatenate(all_y).tolist())


def test_a_labelled_manifest_refuses_shards_without_labels(tmp_path: Path) -> None:
    import json

    from rectflow.pairs import ManifestError

    e = write_shard(tmp_path, 0, np.zeros((4, 2), np.float32), np.ones((4, 2), np.float32))
    man = {"format": 1, "round": 1, "shape": [2], "dim": 2, "n_pairs": 4, "shard_size": 4, "complete": True,
           "labels": {"classes": 2}, "shards": [e]}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ManifestError, match="has no column 'y'"):
        PairStream(tmp_path, seed=0)
