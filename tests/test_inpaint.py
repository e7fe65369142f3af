"""FlowChef-style inpainting (rectflow/steer.py) and ``rectflow sample --inpaint``.

Closed forms with a constant velocity field v = c (x̂1 = x_t + (1 − t)·c, so a step never moves x̂1
and only the steering does): the hidden pixels come out as z0 + c, the known ones as y, and the
student's known-region error shrinks by (1 − η)² per correction. A mask of zeros is plain Euler
sampling bit for bit, with a real (random) network. The CLI refuses each bad input in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import Tensor, nn

from rectflow.arrays import DataError
from rectflow.errors import InputError
from rectflow.imaging import save_grid_png
from rectflow.nets import build_model, save_model
from rectflow.solvers import solve
from rectflow.steer import (
    check_mask,
    inpaint,
    inpaint_one_step,
    inpainting_report,
    masked_mse,
    standard_masks,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 4, 4)


class Constant(nn.Module):
    """v(z, t) = c for every z and t, counting its forwards."""

    def __init__(self, c: Tensor) -> None:
        super().__init__()
        self.c, self.calls = c, 0

    def forward(self, z: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (len(z),)
        self.calls += 1
        return self.c.expand_as(z)


def draws(n: int = 5, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, *SHAPE), generator=g), torch.randn((n, *SHAPE), generator=g),
            torch.randn((1, *SHAPE), generator=g))  # y, z0, c


def mlp(shape: tuple[int, ...], seed: int = 0) -> tuple[nn.Module, dict]:
    arch = {"kind": "mlp", "shape": list(shape), "time_embed": 8, "hidden": 16, "depth": 2}
    torch.manual_seed(seed)
    return build_model(arch).eval(), arch


# ---- the steering itself: closed forms ---------------------------------------------------------------

def test_constant_field_reaches_y_on_the_known_region_and_keeps_the_rest():
    y, z0, c = draws()
    v = Constant(c)
    m = standard_masks(SHAPE)["half"]
    out = inpaint(v, y, m, z0, steps=7, strength=0.3)
    assert out.nfe == v.calls == 7
    known = m.expand_as(y).bool()
    assert torch.equal(out.x[known], y[known])
    torch.testing.assert_close(out.x[~known], (z0 + c)[~known], rtol=0, atol=1e-6)  # x̂1 never moved there
    assert out.known_mse < 1e-12  # the last step (η = 1) lands the un-pasted result on y


def test_mask_of_ones_returns_y_and_mask_of_zeros_is_plain_euler_bit_for_bit():
    y, z0, _ = draws()
    net, _ = mlp(SHAPE)
    full = inpaint(net, y, torch.ones(SHAPE), z0, steps=6)
    assert torch.equal(full.x, y) and full.nfe == 6
    empty = inpaint(net, y, torch.zeros(4, 4), z0, steps=6, strength=0.7)
    with torch.inference_mode():
        plain = solve(net, z0, "euler", 6)
    assert torch.equal(empty.x, plain.x) and empty.nfe == plain.nfe == 6 and empty.known_mse is None


def test_hidden_pixels_of_y_are_never_read():
    y, z0, _ = draws()
    net, _ = mlp(SHAPE)
    m = standard_masks(SHAPE)["centre"]
    other = torch.where(m.bool(), y, torch.full_like(y, 1e6))
    assert torch.equal(inpaint(net, y, m, z0, 4).x, inpaint(net, other, m, z0, 4).x)
    assert torch.equal(inpaint_one_step(net, y, m, z0, 2).x, inpaint_one_step(net, other, m, z0, 2).x)


@pytest.mark.parametrize("corrections, strength", [(0, 1.0), (1, 1.0), (2, 0.5), (3, 0.25)])
def test_one_step_corrections_shrink_the_known_error_by_one_minus_eta_squared(corrections, strength):
    y, z0, c = draws()
    v = Constant(c)
    m = standard_masks(SHAPE)["random"]
    out = inpaint_one_step(v, y, m, z0, corrections, strength)
    assert out.nfe == v.calls == corrections + 1
    known = m.expand_as(y).bool()
    start = float((z0 + c - y)[known].square().mean())  # the uncorrected one-step result's error
    assert out.known_mse == pytest.approx(start * (1 - strength) ** (2 * corrections), rel=1e-5, abs=1e-12)
    torch.testing.assert_close(out.x[~known], (z0 + c)[~known], rtol=0, atol=1e-6)
    assert torch.equal(out.x[known], y[known])


def test_per_image_masks_and_shape_checks_at_the_boundary():
    y, z0, c = draws(n=3)
    masks = torch.stack([standard_masks(SHAPE)[k][0, 0] for k in ("half", "centre", "random")])  # (3, h, w)
    out = inpaint(Constant(c), y, masks, z0, steps=3)
    for i in range(3):
        known = masks[i].bool().expand(SHAPE)
        assert torch.equal(out.x[i][known], y[i][known])
    with pytest.raises(DataError, match=r"z0: expected the shape of y \(3, 1, 4, 4\), got \(2, 1, 4, 4\)"):
        inpaint(Constant(c), y, masks, z0[:2], steps=3)
    with pytest.raises(DataError, match="y: contains NaN"):
        inpaint(Constant(c), y.index_fill(0, torch.tensor([1]), float("nan")), masks, z0, steps=3)
    with pytest.raises(DataError, match=r"holds 3 masks for 2 images"):
        inpaint_one_step(Constant(c), y[:2], masks, z0[:2])


# ---- masks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, expected", [
    (np.ones((3, 3)), "expected shape (c, h, w) = (1, 4, 4), (h, w) = (4, 4), (n, 1, 4, 4) or (n, 4, 4), got (3, 3)"),
    (np.full((4, 4), 0.5), "expected 1 (observed) or 0 (to fill) at every pixel, found 0.5"),
    (np.where(np.eye(4), np.nan, 1.0), "contains NaN"),
    (np.ones((3, 4, 4)), "holds 3 masks for 5 images; expected 1 or 5"),
    (np.ones((0, 1, 4, 4)), "holds no mask"),
    (np.array([["a"] * 4] * 4), "expected a numeric array"),
], ids=["shape", "not-binary", "nan", "count", "empty", "strings"])
def test_check_mask_refuses_in_one_line_naming_where(mask, expected):
    with pytest.raises(DataError) as e:
        check_mask(mask, SHAPE, n=5, where="--mask m.npy")
    assert isinstance(e.value, InputError)  # the CLI's exit 2
    assert str(e.value).startswith("--mask m.npy: ") and expected in str(e.value) and "\n" not in str(e.value)


def test_check_mask_takes_every_documented_form():
    shape = (3, 4, 4)
    hw = (np.arange(16).reshape(4, 4) % 2).astype(np.float64)
    for mask, rows in ((hw, 1), (np.stack([hw] * 3), 1), (np.stack([hw, 1 - hw]), 2),
                       (np.ones((2, 3, 4, 4), bool), 2), (torch.zeros(4, 4), 1)):
        out = check_mask(mask, shape, n=2)
        assert out.shape == (rows, 3, 4, 4) and out.dtype == torch.float32
    assert torch.equal(check_mask(hw, shape)[0, 2], torch.from_numpy(hw).float())  # (h, w) on every channel


def test_standard_masks_shapes_and_fractions():
    masks = standard_masks((3, 8, 8), seed=1)
    assert sorted(masks) == ["centre", "half", "random"]
    hidden = {k: float(1 - m.mean()) for k, m in masks.items()}
    assert hidden == {"half": 0.5, "centre": 0.25, "random": 0.5}
    for m in masks.values():
        assert m.shape == (1, 3, 8, 8) and torch.equal(m[0, 0], m[0, 2])
    assert masks["half"][0, 0, 4:].sum() == 0 and masks["half"][0, 0, :4].min() == 1  # the bottom half hidden
    assert masks["centre"][0, 0, 2:6, 2:6].sum() == 0 and masks["centre"].sum() == 3 * 48
    assert torch.equal(masks["random"], standard_masks((3, 8, 8), seed=1)["random"])
    assert not torch.equal(masks["random"], standard_masks((3, 8, 8), seed=2)["random"])
    with pytest.raises(DataError, match=r"image data of shape \(c, h, w\), got shape \(2,\)"):
        standard_masks((2,))


def test_masked_mse_counts_hidden_pixels_only():
    truth = torch.zeros(2, *SHAPE)
    m = standard_masks(SHAPE)["half"]
    x = torch.where(m.bool(), truth + 100.0, truth + 2.0)  # far off where known: not counted
    assert masked_mse(x, truth, m) == 4.0


# ---- the report the evaluate stage calls ---------------------------------------------------------------

def test_inpainting_report_rows_and_grid(tmp_path):
    x_test, _, c = draws(n=6, seed=3)
    student, _ = mlp(SHAPE, seed=1)
    masks = standard_masks(SHAPE)
    rep = inpainting_report(("const", Constant(c)), ("mlp", student), x_test, masks, steps=5,
                            fd_fn=lambda x: float(x.mean()), seed=4, examples=2)
    assert [(r["model"], r["mask"], r["nfe"]) for r in rep.rows] == [
        (model, mask, nfe) for mask in ("half", "centre", "random") for model, nfe in (("const", 5), ("mlp", 2))]
    z0 = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(4))
    for row in rep.rows[::2]:  # the constant field's hidden pixels are z0 + c
        m = masks[row["mask"]]
        assert row["masked_mse"] == pytest.approx(masked_mse(z0 + c, x_test, m), rel=1e-5)
        assert row["fd"] == pytest.approx(float(torch.where(m.bool(), x_test, z0 + c).mean()), abs=1e-6)
    assert rep.nrow == 2 and rep.grid.shape == (4 * 3 * 2, *SHAPE)
    np.testing.assert_array_equal(rep.grid[:2], x_test[:2].numpy())  # ground truth, then the masked input
    np.testing.assert_array_equal(rep.grid[2:4], (masks["half"] * x_test[:2]).numpy())
    save_grid_png(rep.grid, tmp_path / "g.png", nrow=rep.nrow)
    assert (tmp_path / "g.png").stat().st_size > 0


# ---- rectflow sample --inpaint ---------------------------------------------------------------------------

@pytest.fixture
def ws(tmp_path: Path, monkeypatch) -> Path:
    """Models (an image flow, a one-step student, a vector flow), 3 images and their files."""
    models = tmp_path / "models"
    models.mkdir()
    for name, shape, meta in (("flow", SHAPE, {"role": "flow"}), ("student", SHAPE, {"role": "student", "steps": 1}),
                              ("vec", (2,), {"role": "flow"})):
        net, arch = mlp(shape)
        save_model(models / name, net.state_dict(), arch, meta)
    y, _, _ = draws(n=3)
    np.save(tmp_path / "x.npy", y.numpy())
    np.save(tmp_path / "x_flat.npy", y.numpy().reshape(3, 16))
    pq.write_table(pa.table({f"d{i}": y.numpy().reshape(3, 16)[:, i] for i in range(16)}), tmp_path / "x.parquet")
    np.save(tmp_path / "m.npy", standard_masks(SHAPE)["half"][0, 0].numpy())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sample(*args: str) -> int:
    from flows.cli import app

    return app(["sample", "--out", "out.parquet", *args], standalone_mode=False)


def write(ws: Path, name: str, arr: np.ndarray) -> str:
    np.save(ws / name, arr)
    return name


BAD = {  # name -> (arguments after --model, a word the line must hold)
    "mask-without-inpaint": (["flow", "--mask", "m.npy"], "--mask FILE needs --inpaint FILE"),
    "inpaint-without-mask": (["flow", "--inpaint", "x.npy"], "--inpaint FILE needs --mask FILE"),
    "vector-model": (["vec", "--inpaint", "x.npy", "--mask", "m.npy"], "needs an image model"),
    "wrong-dimension": (["flow", "--inpaint", "x5.npy", "--mask", "m.npy"], "expected a numeric array of shape (n, 16) or (n, 1, 4, 4)"),
    "nan-input": (["flow", "--inpaint", "xnan.npy", "--mask", "m.npy"], "has NaN or infinite values"),
    "mask-shape": (["flow", "--inpaint", "x.npy", "--mask", "m3.npy"], "got (3, 3)"),
    "mask-not-binary": (["flow", "--inpaint", "x.npy", "--mask", "mhalf.npy"], "found 0.5"),
    "mask-count": (["flow", "--inpaint", "x.npy", "--mask", "m2.npy"], "holds 2 masks for 3 images"),
    "mask-missing": (["flow", "--inpaint", "x.npy", "--mask", "nope.npy"], "--mask: nope.npy not found"),
    "solver": (["flow", "--inpaint", "x.npy", "--mask", "m.npy", "--solver", "heun"], "steers Euler steps"),
    "strength-alone": (["flow", "--strength", "0.5"], "--strength: only with --inpaint"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_sample_inpaint_bad_input_is_one_line_exit_2_nothing_written(ws, capsys, case):
    write(ws, "x5.npy", np.zeros((3, 5), np.float32))
    write(ws, "xnan.npy", np.where(np.eye(16)[:3].reshape(3, *SHAPE), np.nan, 0).astype(np.float32))
    write(ws, "m3.npy", np.ones((3, 3)))
    write(ws, "mhalf.npy", np.full(SHAPE, 0.5))
    write(ws, "m2.npy", np.ones((2, *SHAPE)))
    before = sorted(p.name for p in ws.rglob("*"))
    args, word = BAD[case]
    assert sample("--model", f"models/{args[0]}", *args[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rectflow: error: ") and word in err[0], err
    assert sorted(p.name for p in ws.rglob("*")) == before


@pytest.mark.parametrize("images", ["x.npy", "x_flat.npy", "x.parquet"])
def test_sample_inpaint_student_completes_the_images(ws, capsys, images):
    assert sample("--model", "models/student", "--inpaint", images, "--mask", "m.npy", "--steps", "3") in (0, None)
    table = pq.read_table(ws / "out.parquet")
    meta = json.loads(table.schema.metadata[b"rectflow"])
    assert meta["nfe"] == 3 and meta["inpaint"]["nfe"] == 3 and meta["inpaint"]["file"] == images
    assert set(meta["inpaint"]) == {"file", "mask", "nfe", "strength", "known_mse"}
    x = np.stack([table.column(f"d{i}").to_numpy() for i in range(16)], 1).reshape(3, *SHAPE)
    y = np.load(ws / "x.npy")
    np.testing.assert_array_equal(x[:, :, :2], y[:, :, :2])  # the observed top half, as given
    assert not np.allclose(x[:, :, 2:], y[:, :, 2:])


def test_rectflow_sample_inpaint_end_to_end(ws):
    """The real command line, in its own process: a flow at 4 steps, per-image Parquet masks."""
    masks = np.stack([standard_masks(SHAPE)[k][0].numpy().reshape(16) for k in ("half", "centre", "random")])
    pq.write_table(pa.table({f"d{i}": masks[:, i] for i in range(16)}), ws / "m.parquet")
    r = subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--model", "models/flow", "--out", "o.parquet",
                        "--inpaint", "x.npy", "--mask", "m.parquet", "--steps", "4", "--seed", "7"],
                       cwd=ws, capture_output=True, text=True, timeout=120, check=False, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nfe"] == 4
    table = pq.read_table(ws / "o.parquet")
    meta = json.loads(table.schema.metadata[b"rectflow"])
    assert meta["inpaint"]["known_mse"] < 1e-10 and meta["seed"] == 7
    x = np.stack([table.column(f"d{i}").to_numpy() for i in range(16)], 1)
    y = np.load(ws / "x.npy").reshape(3, 16)
    net, _ = mlp(SHAPE)
    z0 = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(7))
    expected = inpaint(net, torch.from_numpy(y).reshape(3, *SHAPE), masks.reshape(3, *SHAPE), z0, 4).x
    np.testing.assert_allclose(x, expected.numpy().reshape(3, 16), rtol=0, atol=1e-6)
