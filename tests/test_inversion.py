"""Running the flow backwards in the pipeline: inversion pairs in couple (2-RF++), ``rectflow
invert`` / ``transfer`` on a user's points, and the reconstruction metric against closed forms."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rectflow.metrics import reconstruction
from rectflow.models import load_model
from rectflow.solvers import invert, solve
from tests.tinyws import OVERRIDES, cli, ws  # noqa: F401 (ws: a fixture)

SMALL = [*OVERRIDES, "couple.n_pairs=300", "couple.shard_size=150", "couple.batch_size=150", "couple.steps=4"]


def _pairs(ws: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    from rectflow.pairs import read_manifest, read_shard

    man = read_manifest(ws / "data/couplings/round-1")
    z0, z1 = zip(*(read_shard(ws / "data/couplings/round-1", e, tuple(man["shape"])) for e in man["shards"]))
    return np.concatenate(z0), np.concatenate(z1), man


# ---- couple.source: inversion | mixed ------------------------------------------------------------------


def test_inversion_pairs_are_real_rows_and_the_flows_inversion_of_them(ws: Path) -> None:
    from rectflow.data import load_prepared
    from tasks.runner import run_stage

    rec = run_stage("couple", ws / "params.yaml", [*SMALL, "couple.source=inversion"], root=ws)
    z0, z1, man = _pairs(ws)
    train = load_prepared(ws / "data/prepared", "target", "train").data.numpy().reshape(-1, 2)
    # every Z1 is a training row, bit for bit, and no row is used twice while rows remain
    rows = {r.tobytes(): i for i, r in enumerate(train)}
    used = [rows.get(r.tobytes()) for r in z1.reshape(len(z1), -1)]
    assert None not in used and len(set(used)) == len(used) == 300
    # and every Z0 is rf1's 4-step Euler inversion of it
    net, _ = load_model(ws / "models" / "rf1")
    with torch.inference_mode():
        expect = invert(net, torch.from_numpy(z1), "euler", 4).x.numpy()
    np.testing.assert_allclose(z0, expect, rtol=1e-5, atol=1e-5)
    assert man["pairs_from"] == {"source": "inversion", "inversion_fraction": 1.0, "inverted_pairs": 300,
                                 "real_rows": len(train)}
    assert rec["nfe_total"] == 2 * 4  # two shards, four backward steps each


def test_mixed_pairs_invert_their_share_of_each_shard_and_noise_makes_the_rest(ws: Path) -> None:
    from tasks.runner import run_stage

    run_stage("couple", ws / "params.yaml", [*SMALL, "couple.source=mixed", "couple.inversion_fraction=0.4"], root=ws)
    z0, z1, man = _pairs(ws)
    assert man["pairs_from"]["inverted_pairs"] == 2 * 60
    net, _ = load_model(ws / "models" / "rf1")
    with torch.inference_mode():
        for s in (slice(0, 60), slice(150, 210)):  # each shard: its inverted rows first
            np.testing.assert_allclose(z0[s], invert(net, torch.from_numpy(z1[s]), "euler", 4).x.numpy(), atol=1e-5)
        for s in (slice(60, 150), slice(210, 300)):  # then noise and its forward solution
            np.testing.assert_allclose(z1[s], solve(net, torch.from_numpy(z0[s]), "euler", 4).x.numpy(), atol=1e-5)


def test_noise_pairs_keep_their_fingerprint_whatever_the_inversion_settings(ws: Path) -> None:
    from tasks.runner import run_stage

    run_stage("couple", ws / "params.yaml", SMALL, root=ws)
    fp = _pairs(ws)[2]["fingerprint"]
    again = run_stage("couple", ws / "params.yaml", [*SMALL, "couple.inversion_fraction=0.9"], root=ws)
    assert again["shards_reused"] == 2 and _pairs(ws)[2]["fingerprint"] == fp and "pairs_from" not in _pairs(ws)[2]
    inv = run_stage("couple", ws / "params.yaml", [*SMALL, "couple.source=inversion"], root=ws)
    assert inv["shards_made"] == 2 and _pairs(ws)[2]["fingerprint"] != fp


# ---- rectflow invert / transfer ------------------------------------------------------------------------


def _points(path: Path, x: np.ndarray, **extra: np.ndarray) -> Path:
    pq.write_table(pa.table({f"d{i}": x[:, i] for i in range(x.shape[1])} | extra), path)
    return path


def test_invert_then_sample_the_same_points_back_with_labels_carried(ws: Path, monkeypatch, capsys) -> None:
    x1 = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    labels = np.arange(50) % 3
    src = _points(ws / "x1.parquet", x1, y=labels, id=np.array([f"r{i}" for i in range(50)]))
    rc, out, err = cli(monkeypatch, capsys, "invert", "--model", str(ws / "models/rf1"), "--in", str(src),
                       "--out", str(ws / "x0.parquet"), "--steps", "6", "--solver", "heun")
    assert rc == 0, err
    assert json.loads(out)["nfe"] == 12 and json.loads(out)["direction"] == "backward"
    table = pq.read_table(ws / "x0.parquet")
    assert table.column_names == ["d0", "d1", "y", "id"]
    assert table.column("y").to_numpy().tolist() == labels.tolist() and table.column("id")[7].as_py() == "r7"
    meta = json.loads(table.schema.metadata[b"rectflow"])
    assert meta["command"] == "invert" and meta["solver"] == "heun" and meta["nfe"] == 12
    x0 = np.stack([table.column("d0").to_numpy(), table.column("d1").to_numpy()], 1)
    net, _ = load_model(ws / "models" / "rf1")
    with torch.inference_mode():
        np.testing.assert_allclose(x0, invert(net, torch.from_numpy(x1), "heun", 6).x.numpy(), atol=1e-5)
    np.save(ws / "x1.npy", x1)  # .npy in gives the same points
    rc, _, err = cli(monkeypatch, capsys, "invert", "--model", str(ws / "models/rf1"), "--in", str(ws / "x1.npy"),
                     "--out", str(ws / "x0b.parquet"), "--steps", "6", "--solver", "heun")
    assert rc == 0, err
    assert pq.read_table(ws / "x0b.parquet").column("d1").to_numpy().tolist() == x0[:, 1].tolist()


@pytest.mark.parametrize("case,args,message", [
    ("wrong-dimension", ["--in", "{ws}/x3.parquet"], "expected feature columns d0 … d1 for this model's dimension 2"),
    ("extra-column", ["--in", "{ws}/x3.parquet"], None),
    ("nan", ["--in", "{ws}/nan.parquet"], "row 3 (and 0 more) has NaN or infinite values"),
    ("npy-shape", ["--in", "{ws}/bad.npy"], "expected a numeric array of shape (n, 2)"),
    ("csv", ["--in", "{ws}/x.csv"], "expected a .parquet or .npy file"),
    ("missing", ["--in", "{ws}/none.parquet"], "no such file"),
    ("student", ["--model", "{ws}/models/student"], "a 1-step student is a map, not a velocity field"),
    ("transfer-noise", ["transfer"], "its source π0 is noise, not a data set"),
    ("direction", ["transfer", "--direction", "sideways"], "--direction: unknown 'sideways'"),
    ("solver", ["--solver", "rk4"], "--solver: unknown 'rk4'"),
    ("bellman-rk45", ["--solver", "rk45", "--schedule", "bellman"], "'bellman' needs a fixed-step solver"),
])
def test_bad_points_or_models_are_one_line_and_exit_2(ws: Path, monkeypatch, capsys, case, args, message) -> None:
    import shutil

    x = np.zeros((5, 2), np.float32)
    _points(ws / "x.parquet", x)
    _points(ws / "x3.parquet", np.zeros((5, 1 if case == "wrong-dimension" else 3), np.float32))
    x[3, 1] = np.nan
    _points(ws / "nan.parquet", x)
    np.save(ws / "bad.npy", np.zeros((5, 3), np.float32))
    (ws / "x.csv").write_text("d0,d1\n0,0\n")
    for suffix in (".safetensors", ".json"):  # rf1's weights as a one-step student
        shutil.copy(ws / "models" / f"rf1{suffix}", ws / "models" / f"student{suffix}")
    card = json.loads((ws / "models/student.json").read_text())
    card["meta"] |= {"role": "student", "steps": 1}
    (ws / "models/student.json").write_text(json.dumps(card))
    command = "transfer" if args and args[0] == "transfer" else "invert"
    rest = [a.format(ws=ws) for a in (args[1:] if command == "transfer" else args)]
    base = {"--model": str(ws / "models/rf1"), "--in": str(ws / "x.parquet"), "--out": str(ws / "out.parquet")}
    for flag in ("--model", "--in"):
        if flag in rest:
            base.pop(flag)
    rc, out, err = cli(monkeypatch, capsys, command, *[a for kv in base.items() for a in kv], *rest)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("rectflow: error: "), (rc, err)
    assert message is None or message in lines[0], lines[0]
    assert not (ws / "out.parquet").exists() and out == ""


def test_transfer_carries_points_between_two_data_sets_both_ways(tmp_path: Path, monkeypatch, capsys) -> None:
    import shutil

    from tasks.runner import run_stage
    from tests.conftest import ROOT

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    sets = [*OVERRIDES, "data.source=8gaussians", "pretrain.steps=40"]
    for stage in ("prepare", "pretrain"):
        run_stage(stage, tmp_path / "params.yaml", sets, root=tmp_path)
    card = json.loads((tmp_path / "models/rf1.json").read_text())
    assert card["meta"]["source"] == "8gaussians"
    x = np.random.default_rng(1).normal(size=(40, 2)).astype(np.float32)
    _points(tmp_path / "a.parquet", x)
    rc, _, err = cli(monkeypatch, capsys, "transfer", "--model", str(tmp_path / "models/rf1"), "--in",
                     str(tmp_path / "a.parquet"), "--out", str(tmp_path / "b.parquet"), "--steps", "5",
                     "--solver", "euler")
    assert rc == 0, err
    rc, out, err = cli(monkeypatch, capsys, "transfer", "--model", str(tmp_path / "models/rf1"), "--in",
                       str(tmp_path / "b.parquet"), "--out", str(tmp_path / "c.parquet"), "--direction", "backward",
                       "--steps", "5", "--solver", "euler")
    assert rc == 0 and json.loads(out)["direction"] == "backward", err
    b = pq.read_table(tmp_path / "b.parquet")
    net, _ = load_model(tmp_path / "models" / "rf1")
    with torch.inference_mode():
        fwd = solve(net, torch.from_numpy(x), "euler", 5).x.numpy()
    np.testing.assert_allclose(np.stack([b.column("d0").to_numpy(), b.column("d1").to_numpy()], 1), fwd, atol=1e-5)
    assert json.loads(b.schema.metadata[b"rectflow"])["direction"] == "forward"


# ---- the reconstruction metric -------------------------------------------------------------------------


X1 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint", "rk45"])
def test_a_straight_field_reconstructs_exactly_at_one_step(solver: str) -> None:
    r = reconstruction(lambda z, t: torch.full_like(z, 0.3), X1, solver, None if solver == "rk45" else 1,
                       data_range=2.0)
    assert r["mse"] < 1e-20 and r["psnr"] > 150
    assert r["nfe_total"] == 2 * r["nfe"] or solver == "rk45"


@pytest.mark.parametrize("steps", [1, 4])
def test_euler_reconstruction_of_a_linear_field_matches_its_closed_form(steps: int) -> None:
    a = 0.9  # back: × (1 − a/n)^n, forward: × (1 + a/n)^n
    f = (1 - a / steps) ** steps * (1 + a / steps) ** steps
    r = reconstruction(lambda z, t: a * z, X1, "euler", steps)
    assert math.isclose(r["mse"], float(((f - 1) * X1).pow(2).mean()), rel_tol=1e-12)
    assert r["nfe"] == steps and r["nfe_total"] == 2 * steps


def test_a_lost_inversion_shard_is_remade_bit_for_bit(ws: Path) -> None:  # noqa: F811
    """Inversion shards depend only on (seed, round, index), like noise shards: a round that lost
    one is repaired by remaking that one alone, to the same bytes."""
    from tasks.runner import run_stage

    sets = [*SMALL, "couple.source=mixed", "couple.inversion_fraction=0.5"]
    run_stage("couple", ws / "params.yaml", sets, root=ws)
    before = _pairs(ws)[2]
    (ws / "data/couplings/round-1" / before["shards"][1]["name"]).unlink()
    again = run_stage("couple", ws / "params.yaml", sets, root=ws)
    assert again["shards_made"] == 1 and again["shards_reused"] == 1
    assert [e["sha256"] for e in _pairs(ws)[2]["shards"]] == [e["sha256"] for e in before["shards"]]
