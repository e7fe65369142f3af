"""Past one process: coupling shards on a real local Dask cluster (Prefect's DaskTaskRunner) and
data-parallel training under a real ``torchrun`` (gloo, two CPU processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rectflow.pairs import PairStream, write_shard
from tests.tinyws import OVERRIDES, copy_workspace, sets, trained_workspace

BIN = Path(sys.executable).parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
           # Prefect's temporary server on a database of this test's own (never the user's).
           "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for var in ("RECTFLOW_LOCK_HELD", "PREFECT_API_URL", "RECTFLOW_DASK_ADDRESS", "WORLD_SIZE", "RANK"):
        env.pop(var, None)
    return env | extra


def _stage(ws: Path, tmp_path: Path, stage: str, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rectflow"), "stage", stage, *sets(overrides)], cwd=ws, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_workspace(tmp_path_factory)


def test_couple_on_two_dask_workers_writes_the_same_shards_as_one(trained: Path, tmp_path: Path) -> None:
    one, two = copy_workspace(trained, tmp_path / "one"), copy_workspace(trained, tmp_path / "two")
    over = [*OVERRIDES, "couple.n_pairs=1500", "couple.shard_size=300", "couple.batch_size=300"]  # 5 shards

    from tasks.runner import run_stage

    rec1 = run_stage("couple", one / "params.yaml", [*over, "couple.workers=1"], root=one)  # in process
    assert rec1["shards_made"] == 5
    r2 = _stage(two, tmp_path, "couple", [*over, "couple.workers=2"])  # the real CLI, a real cluster
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "5 shard(s) on a local Dask cluster of 2 workers" in r2.stderr
    assert r2.stderr.count("made on Dask") == 5

    m1 = json.loads((one / "data/couplings/round-1/manifest.json").read_text())
    m2 = json.loads((two / "data/couplings/round-1/manifest.json").read_text())
    assert m1["complete"] and m2["complete"] and len(m1["shards"]) == 5
    assert [e["sha256"] for e in m1["shards"]] == [e["sha256"] for e in m2["shards"]]
    assert m1 == m2  # rows, bytes, NFE, transport cost, fingerprint: everything
    assert not (two / ".rectflow/staging/couplings/round-1").exists()
    rec = json.loads(r2.stdout.strip().splitlines()[-1])
    assert rec["shards_made"] == 5 and rec["n_pairs"] == 1500


def test_pretrain_under_torchrun_two_ranks_identical_weights_one_checkpoint(trained: Path, tmp_path: Path) -> None:
    ws = copy_workspace(trained, tmp_path / "ddp")
    for f in ("models/rf1.safetensors", "models/rf1.json", "models/rf1.schedule.json", "metrics/pretrain.json"):
        (ws / f).unlink()
    # 60 steps, a checkpoint every 40: exactly one checkpoint is due (at step 40).
    r = _stage(ws, tmp_path, "pretrain", [*OVERRIDES, "pretrain.nproc=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torchrun --standalone --nproc_per_node 2" in r.stderr

    rec = json.loads((ws / "metrics/pretrain.json").read_text())
    assert rec["world"] == 2 and rec["steps_run"] == 60
    assert rec["checkpoints_written"] == [1, 0]  # rank 0 wrote the one checkpoint; rank 1 none
    a, b = rec["rank_weights_sha256"]
    assert a == b  # both ranks ended with the same weights (train() also checks it)

    from rectflow.models import load_model
    from rectflow.train import weights_sha256

    saved, _card = load_model(ws / "models/rf1", torch.device("cpu"))
    assert weights_sha256(saved) == a  # ... and they are the weights rank 0 saved
    assert sorted(p.name for p in (ws / "models").iterdir()) == ["rf1.json", "rf1.safetensors", "rf1.schedule.json"]
    assert json.loads((ws / "models/rf1.schedule.json").read_text())["meta"]["model_sha256"] == rec["sha256"]  # rank 0's
    assert list((ws / ".rectflow/checkpoints/rf1").iterdir()) == []  # removed once the model is saved
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["sha256"] == rec["sha256"]  # one summary, the launcher's


def test_pair_stream_ranks_split_each_global_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        z0 = rng.standard_normal((50, 2)).astype(np.float32)
        write_shard(tmp_path, i, z0, z0 + 1)
    entries = [{"name": f"shard-{i:05d}.parquet", "rows": 50} for i in range(3)]
    from rectflow.io import atomic_write_json, file_sha256

    for e in entries:
        e |= {"sha256": file_sha256(tmp_path / e["name"]), "bytes": (tmp_path / e["name"]).stat().st_size}
    atomic_write_json(tmp_path / "manifest.json", {"shape": [2], "complete": True, "shards": entries, "n_pairs": 150})

    solo = PairStream(tmp_path, seed=3, buffer_shards=2)
    ranks = [PairStream(tmp_path, seed=3, buffer_shards=2, rank=r, world=2) for r in (0, 1)]
    for _ in range(7):  # crosses buffers and epochs
        x0, x1 = solo.next_batch(16)
        parts = [s.next_batch(8) for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x0) and torch.equal(torch.cat([p[1] for p in parts]), x1)
    assert ranks[0].state_dict() == ranks[1].state_dict() == solo.state_dict()


def test_adversarial_distill_under_torchrun_two_ranks_identical_weights(trained: Path, tmp_path: Path) -> None:
    """The discriminator is DDP-wrapped beside the student: two ranks end with the same student."""
    ws = copy_workspace(trained, tmp_path / "adv")
    from tasks.runner import run_stage

    for stage in ("couple", "reflow"):
        run_stage(stage, ws / "params.yaml", OVERRIDES, root=ws)
    over = [*OVERRIDES, "distill.nproc=2", "distill.steps=30", "distill.adversarial.weight=0.1",
            "distill.adversarial.channels=8"]
    r = _stage(ws, tmp_path, "distill", over)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((ws / "metrics/distill.json").read_text())["students"][0]
    assert rec["world"] == 2 and rec["steps_run"] == 30
    a, b = rec["rank_weights_sha256"]
    assert a == b
    header = (ws / "plots/train/distilled.csv").read_text().splitlines()[0]
    assert header.split(",") == ["step", "loss", "lr", "samples_per_s", "d_loss"]  # the discriminator's, too


@pytest.mark.parametrize("method", ["meanflow", "slimflow"])
def test_meanflow_and_slimflow_distill_under_torchrun_two_ranks(trained: Path, tmp_path: Path, method: str) -> None:
    """MeanFlow's JVP runs through the DDP-wrapped student, SlimFlow's teacher beside it: two ranks
    end with the same weights."""
    ws = copy_workspace(trained, tmp_path / method)
    from tasks.runner import run_stage

    for stage in ("couple", "reflow"):
        run_stage(stage, ws / "params.yaml", OVERRIDES, root=ws)
    over = [*OVERRIDES, "distill.nproc=2", "distill.steps=20", f"distill.method={method}",
            "distill.student={hidden: 16, depth: 2}", "distill.slimflow.reflow_steps=10"]
    r = _stage(ws, tmp_path, "distill", over)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((ws / "metrics/distill.json").read_text())["students"][0]
    assert rec["world"] == 2 and rec["method"] == method
    assert rec["steps_run"] == (30 if method == "slimflow" else 20)
    a, b = rec["rank_weights_sha256"]
    assert a == b
