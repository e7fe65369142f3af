"""Conditional runs through the real CLI (issue 16): a class-conditional 8gaussians workspace, a
guided couple killed by SIGKILL and resumed to the uninterrupted run's bytes, labelled shards, and
``rectflow sample`` with labels, guidance and every bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.test_resume import ENV, ROOT, copy_ws, kill9, poll, run, sha, start

COND = ["data.target=8gaussians", "data.conditional=true", "data.n_train=4000", "data.n_test=1000",
        "pretrain.steps=300", "pretrain.batch_size=256", "pretrain.log_every=50", "pretrain.checkpoint_every=100",
        "model.hidden=64", "bellman.n_samples=64", "bellman.grid_points=10"]
COUPLE = ["couple.n_pairs=24000", "couple.shard_size=1000", "couple.batch_size=1000", "couple.solver=euler",
          "couple.steps=20", "couple.guidance=2.0"]
N_SHARDS = 24


@pytest.fixture(scope="module")
def cond_ws(tmp_path_factory) -> Path:
    """data/prepared (8gaussians with its modes as labels) and a conditional models/rf1."""
    ws = tmp_path_factory.mktemp("cond")
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    for stage in ("prepare", "pretrain"):
        r = run(ws, stage, COND)
        assert r.returncode == 0, r.stderr
    return ws


def test_prepare_and_pretrain_make_a_conditional_flow(cond_ws: Path) -> None:
    meta = json.loads((cond_ws / "data/prepared/meta.json").read_text())
    assert meta["labels"]["classes"] == 8 and meta["labels"]["sides"] == ["target"]
    card = json.loads((cond_ws / "models/rf1.json").read_text())
    assert card["arch"]["classes"] == 8
    assert "target-train-labels" in card["meta"]["inputs"]


def test_guided_couple_sigkill_then_resume_is_byte_identical(cond_ws: Path, tmp_path: Path) -> None:
    over = COND + COUPLE
    solo, crashed = copy_ws(cond_ws, tmp_path / "solo"), copy_ws(cond_ws, tmp_path / "crashed")
    staging = crashed / ".rectflow" / "staging" / "couplings" / "round-1"
    victim = start(crashed, "couple", over)
    reference = start(solo, "couple", over)
    poll(lambda: staging.is_dir() and len(list(staging.glob("shard-*.parquet"))) >= 3, victim,
         what="three finished shards")
    kill9(victim)
    _, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err
    k = len(list(staging.glob("shard-*.parquet")))
    assert 3 <= k < N_SHARDS
    r = run(crashed, "couple", over)
    assert r.returncode == 0, r.stderr
    rec = json.loads((crashed / "metrics/couple.json").read_text())
    assert rec["shards_reused"] == k and rec["shards_made"] == N_SHARDS - k
    final, ref = crashed / "data/couplings/round-1", solo / "data/couplings/round-1"
    for name in sorted(p.name for p in ref.iterdir()):
        assert sha(final / name) == sha(ref / name), name

    man = json.loads((final / "manifest.json").read_text())
    assert man["labels"] == {"classes": 8, "draw": "uniform", "guidance": 2.0, "column": "y"}
    # guided at w = 2: both branches, 2 forwards per Euler step and sample
    assert all(e["nfe"] == 2 * 20 for e in man["shards"])
    t = pq.read_table(final / "shard-00000.parquet")
    y = t.column("y").to_numpy()
    assert t.schema.field("y").type == "int64" and set(np.unique(y)) <= set(range(8))
    # the guided teacher sends each pair to its label's mode
    from rectflow.data import EIGHT_CENTERS

    z1 = np.stack(t.column("z1").to_numpy(zero_copy_only=False))
    nearest = ((z1[:, None] - EIGHT_CENTERS[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == y).mean() > 0.95


def _sample(ws: Path, *args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run([sys.executable, "-m", "flows.cli", "sample", "--model", "models/rf1", "--steps", "4",
                           *args], cwd=ws, env=ENV, capture_output=True, text=True, timeout=120)


def test_sample_with_a_label_and_guidance_writes_the_labels(cond_ws: Path) -> None:
    r = _sample(cond_ws, "--n", "50", "--label", "3", "--guidance", "2", "--out", "s.parquet")
    assert r.returncode == 0, r.stderr
    t = pq.read_table(cond_ws / "s.parquet")
    assert set(t.column("y").to_numpy()) == {3}
    meta = json.loads(t.schema.metadata[b"rectflow"])
    assert meta["nfe"] == 8 and meta["guidance"] == 2.0  # 4 steps × 2 forwards
    np.save(cond_ws / "labels.npy", np.array([0, 1, 2, 7]))
    r = _sample(cond_ws, "--labels", "labels.npy", "--out", "l.parquet")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(cond_ws / "l.parquet").column("y").to_numpy().tolist() == [0, 1, 2, 7]


@pytest.mark.parametrize("args, message", [
    (["--label", "8"], "--label (--model models/rf1): labels must be integers in [0, 8), got 8 at row 0"),
    (["--label", "-1"], "labels must be integers in [0, 8), got -1 at row 0"),
    (["--guidance", "-0.5"], "--guidance: expected a finite scale w ≥ 0, got -0.5"),
    (["--labels", "floats.npy"], "expected a non-empty 1-D array of integer class labels"),
    (["--label", "1", "--labels", "labels.npy"], "--label and --labels: give one"),
])
def test_sample_refuses_bad_labels_in_one_line(cond_ws: Path, args: list[str], message: str) -> None:
    np.save(cond_ws / "floats.npy", np.array([0.5, 1.0]))
    np.save(cond_ws / "labels.npy", np.array([0, 1]))
    r = _sample(cond_ws, *args, "--out", "bad.parquet")
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (cond_ws / "bad.parquet").exists()


def test_a_label_for_an_unconditional_model_is_refused(tmp_path: Path) -> None:
    from tests.tinyws import OVERRIDES

    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
    over = [*OVERRIDES, "pretrain.steps=5"]
    for stage in ("prepare", "pretrain"):
        assert run(ws, stage, over).returncode == 0
    for flags in (["--label", "0"], ["--guidance", "2"]):
        r = _sample(ws, "--n", "4", *flags, "--out", "x.parquet")
        assert r.returncode == 2 and "--model models/rf1 is unconditional" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (ws / "x.parquet").exists()


def test_conditional_true_without_labels_is_one_line(tmp_path: Path) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    r = run(tmp_path, "prepare", ["data.target=scurve", "data.conditional=true"])
    assert r.returncode == 2 and "data.conditional" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "data/prepared/meta.json").exists()


def test_guidance_input_chain_pairs_carry_w_and_the_student_takes_it(cond_ws: Path, tmp_path: Path) -> None:
    """distill.guidance_input: every pair at its own w ~ U(range) (column w), rf2 and the student
    take w as an input; the student then serves any scale at one forward."""
    ws = copy_ws(cond_ws, tmp_path / "gi")
    over = COND + ["couple.n_pairs=2000", "couple.shard_size=1000", "couple.batch_size=1000", "couple.solver=euler",
                   "couple.steps=10", "distill.guidance_input=true", "distill.guidance_range=[0.0, 4.0]",
                   "reflow.steps=30", "reflow.batch_size=128", "distill.steps=30", "distill.batch_size=128"]
    for stage in ("couple", "reflow", "distill"):
        r = run(ws, stage, over)
        assert r.returncode == 0, r.stderr
    man = json.loads((ws / "data/couplings/round-1/manifest.json").read_text())
    assert man["labels"]["column_w"] == "w" and man["labels"]["w_range"] == [0.0, 4.0]
    assert all(e["nfe"] == 2 * 10 for e in man["shards"])  # rf1 guided: both branches at every w
    w = pq.read_table(ws / "data/couplings/round-1/shard-00000.parquet").column("w").to_numpy()
    assert w.dtype == np.float32 and 0.0 <= w.min() and w.max() <= 4.0 and w.std() > 0.5
    man2 = json.loads((ws / "data/couplings/round-2/manifest.json").read_text())
    assert all(e["nfe"] == 10 for e in man2["shards"])  # rf2 takes w as input: one forward per step
    for name in ("rf2", "distilled"):
        assert json.loads((ws / f"models/{name}.json").read_text())["arch"]["guidance_input"] is True
    r = subprocess.run([__import__("sys").executable, "-m", "flows.cli", "sample", "--model", "models/distilled",
                        "--n", "16", "--label", "2", "--guidance", "3", "--out", "g.parquet"],
                       cwd=ws, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(pq.read_table(ws / "g.parquet").schema.metadata[b"rectflow"])["nfe"] == 1
