"""Crash resume for real: SIGKILL a running ``rectflow stage pretrain`` / ``rectflow stage couple``
mid-way, rerun it, and check that no finished work is redone (counted from the stage's own record
and its stderr) and that the result is byte-identical to an uninterrupted run on the same seed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RECTFLOW_THREADS="1", PYTHONUNBUFFERED="1")
ENV.pop("RECTFLOW_LOCK_HELD", None)

# Long enough for a kill to land mid-way on a busy two-core machine, short enough for the suite.
STEPS = 800
PRETRAIN = [f"pretrain.steps={STEPS}", "pretrain.checkpoint_every=100", "pretrain.log_every=30",
            "pretrain.weight_decay=0.01", "pretrain.time_dist=logit_normal"]
COUPLE = ["couple.n_pairs=40000", "couple.shard_size=1000", "couple.batch_size=1000",
          "couple.solver=euler", "couple.steps=20"]
N_SHARDS = 40


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def cmd(stage: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "stage", stage, *sets(overrides)]


def run(ws: Path, stage: str, overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd(stage, overrides), cwd=ws, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(ws: Path, stage: str, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd(stage, overrides), cwd=ws, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def poll(pred, proc: subprocess.Popen, timeout: float = 180.0, what: str = "") -> None:
    """Wait until ``pred()``; fail (with the process's stderr) if it exits or time runs out first."""
    t_end = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-2000:]}")
        if time.monotonic() > t_end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture
def trained(tmp_path_factory, tiny_overrides) -> Path:
    """A workspace with data/prepared, models/rf1 and round-1 couplings (TINY): built once per
    session under the session's base temp (shared with test_bad_input.py). Copy before use."""
    ws = tmp_path_factory.getbasetemp() / "shared-base-coupled"
    if not (ws / ".complete").is_file():
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir()
        shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
        for stage in ("prepare", "pretrain", "couple"):
            r = run(ws, stage, tiny_overrides)
            assert r.returncode == 0, r.stderr
        (ws / ".complete").touch()
    return ws


def copy_ws(src: Path, dst: Path, *drop: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".rectflow", ".complete"))
    for rel in drop:
        p = dst / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


def test_pretrain_sigkill_then_resume_is_bit_identical(trained, tmp_path, tiny_overrides):
    over = tiny_overrides + PRETRAIN
    drop = ("models", "metrics", "plots", "data/couplings")
    solo, crashed = copy_ws(trained, tmp_path / "solo", *drop), copy_ws(trained, tmp_path / "crashed", *drop)
    ckpt = crashed / ".rectflow" / "checkpoints" / "rf1" / "last.pt"

    victim = start(crashed, "pretrain", over)
    reference = start(solo, "pretrain", over)  # the uninterrupted run, meanwhile
    seen: set[tuple[int, int]] = set()

    def two_checkpoints_written() -> bool:
        try:
            st = ckpt.stat()
        except FileNotFoundError:
            return False
        seen.add((st.st_ino, st.st_mtime_ns))
        return len(seen) >= 2

    poll(two_checkpoints_written, victim, what="the second checkpoint")
    kill9(victim)
    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err

    import torch

    state = torch.load(ckpt, weights_only=True)  # never unpickled: weights_only
    saved = int(state["step"])
    assert 100 <= saved < STEPS and saved % 100 == 0
    assert not (crashed / "models" / "rf1.safetensors").exists(), "no model may appear before training ends"
    assert not list((crashed / "models").glob(".*.tmp"))

    (ckpt.parent / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # a kill mid-save leaves this
    r = run(crashed, "pretrain", over)
    assert r.returncode == 0, r.stderr
    assert not list(ckpt.parent.glob(".*.tmp"))
    assert f"[rf1] resuming from checkpoint at step {saved}" in r.stderr
    rec = json.loads((crashed / "metrics" / "pretrain.json").read_text())
    assert rec["resumed_from"] == saved
    assert rec["steps_run"] == STEPS - saved  # not one step before the checkpoint is run again
    ref = json.loads((solo / "metrics" / "pretrain.json").read_text())
    assert ref["resumed_from"] == 0 and ref["steps_run"] == STEPS

    # Weights, EMA, AdamW state, data generator, time sampler and global RNG all restored: the
    # saved model is byte-for-byte the uninterrupted run's.
    assert sha(crashed / "models" / "rf1.safetensors") == sha(solo / "models" / "rf1.safetensors") == ref["sha256"]
    assert rec["sha256"] == ref["sha256"]

    def losses(ws: Path) -> list[tuple[str, str, str]]:
        with open(ws / "plots" / "train" / "rf1.csv") as f:
            return [(row["step"], row["loss"], row["lr"]) for row in csv.DictReader(f)]

    assert losses(crashed) == losses(solo)  # even the loss log (windows straddle the checkpoint)
    assert not ckpt.exists(), "a finished stage removes its checkpoint"


def test_couple_sigkill_then_resume_keeps_finished_shards(trained, tmp_path, tiny_overrides):
    over = tiny_overrides + COUPLE
    drop = ("data/couplings", "metrics/couple.json")
    solo, crashed = copy_ws(trained, tmp_path / "solo", *drop), copy_ws(trained, tmp_path / "crashed", *drop)
    staging = crashed / ".rectflow" / "staging" / "couplings" / "round-1"
    final = crashed / "data" / "couplings" / "round-1"

    victim = start(crashed, "couple", over)
    reference = start(solo, "couple", over)
    poll(lambda: staging.is_dir() and len(list(staging.glob("shard-*.parquet"))) >= 5, victim,
         what="five finished shards")
    kill9(victim)
    out, err = reference.communicate(timeout=240)
    assert reference.returncode == 0, err

    # What the crash left: finished shards under their final names, each listed in the staging
    # manifest with its sha256 (the entry is recorded before the rename), nothing published.
    finished = sorted(p.name for p in staging.glob("shard-*.parquet"))
    k = len(finished)
    assert 5 <= k < N_SHARDS, k
    assert not final.exists(), "the round is published only when complete"
    man = json.loads((staging / "manifest.json").read_text())
    listed = {e["name"]: e for e in man["shards"] if e is not None}
    assert set(finished) <= set(listed)
    inode = {}
    for name in finished:
        assert sha(staging / name) == listed[name]["sha256"]
        inode[name] = (staging / name).stat().st_ino

    (staging / ".shard-00039.parquet.k1ll3d.tmp").write_bytes(b"half a shard")  # a kill mid-write leaves this
    r = run(crashed, "couple", over)
    assert r.returncode == 0, r.stderr
    rec = json.loads((crashed / "metrics" / "couple.json").read_text())
    # Kept by sha256 are exactly the shards that were finished; every other one is made once.
    assert rec["shards_reused"] == k and rec["shards_made"] == N_SHARDS - k, rec
    assert f"resuming, {k} finished shard(s) verified by sha256 and kept" in r.stderr
    solved = [line for line in r.stderr.splitlines() if " solved (NFE " in line]
    assert len(solved) == N_SHARDS - k
    assert not any(f"shard {int(n[6:11]) + 1}/{N_SHARDS} solved" in r.stderr for n in finished)
    for name in finished:  # not rewritten either: the very same files, moved with the round
        assert (final / name).stat().st_ino == inode[name]

    # And the result is the uninterrupted run's, byte for byte: every shard and the manifest.
    ref_final = solo / "data" / "couplings" / "round-1"
    assert sorted(os.listdir(final)) == sorted(os.listdir(ref_final)) == sorted(
        ["manifest.json"] + [f"shard-{i:05d}.parquet" for i in range(N_SHARDS)])
    for name in os.listdir(ref_final):
        assert sha(final / name) == sha(ref_final / name), name
    assert not staging.exists()


def test_reflow_sigkill_in_its_coupling_then_rerun_does_not_retrain(trained, tmp_path, tiny_overrides):
    """Killed while reflow couples round 2, after rf2 and its schedules were saved: the rerun restores
    rf2 from .rectflow/finished (sha256 checked) instead of training it again, also when DVC (as in
    `dvc repro`) has deleted the stage's outputs first; the result is the uninterrupted run's."""
    over = tiny_overrides + ["couple.n_pairs=8000", "couple.shard_size=200", "couple.batch_size=200"]
    solo, crashed = copy_ws(trained, tmp_path / "solo", "metrics"), copy_ws(trained, tmp_path / "crashed", "metrics")
    staging = crashed / ".rectflow" / "staging" / "couplings" / "round-2"
    reference = run(solo, "reflow", over)
    assert reference.returncode == 0, reference.stderr
    victim = start(crashed, "reflow", over)
    poll(lambda: staging.is_dir() and len(list(staging.glob("shard-*.parquet"))) >= 2, victim,
         what="two round-2 shards")
    kill9(victim)
    assert (crashed / "models" / "rf2.safetensors").is_file()
    kept = crashed / ".rectflow" / "finished"
    assert (kept / "rf2.safetensors").is_file() and (kept / "rf2.schedule.json").is_file()
    for rel in ("models/rf2.safetensors", "models/rf2.json", "models/rf2.schedule.json", "plots/train/rf2.csv"):
        (crashed / rel).unlink()  # what dvc repro does to a stage's outputs before it reruns it
    r = run(crashed, "reflow", over)
    assert r.returncode == 0, r.stderr
    assert "[rf2] finished before an interruption: restored" in r.stderr
    assert "[rf2] step" not in r.stderr  # no training step was run
    rec = json.loads((crashed / "metrics" / "reflow.json").read_text())
    assert rec["rounds"][0]["train"]["reused_finished"] is True
    for rel in ("models/rf2.safetensors", "models/rf2.json", "models/rf2.schedule.json",
                "data/couplings/round-2/manifest.json"):
        assert sha(crashed / rel) == sha(solo / rel), rel
    losses = lambda ws: [(r["step"], r["loss"]) for r in csv.DictReader(open(ws / "plots/train/rf2.csv"))]  # noqa: E731
    assert losses(crashed) == losses(solo)  # the history restored too (samples/s is a timing)
    # kept until another stage keeps something (DVC has locked this one by then): see the test below
    assert (kept / "STAGE").read_text().strip() == "reflow" and (kept / "round-2" / "manifest.json").is_file()


@pytest.mark.parametrize("stage", ["couple", "reflow"])
def test_killed_after_the_stage_finished_but_before_dvc_locked_it(stage, trained, tmp_path, tiny_overrides):
    """A kill after the stage wrote its outputs but before DVC locked them: ``dvc repro`` deletes the
    outputs and reruns the stage. The rerun takes back what the stage kept (models, schedules,
    coupling rounds) and computes nothing: no training step, no shard solved; the outputs are the
    first run's, byte for byte. Another stage keeping something drops what was kept."""
    ws = copy_ws(trained, tmp_path / "ws", "metrics")
    outs = {"couple": ["data/couplings/round-1"],
            "reflow": ["models/rf2.safetensors", "models/rf2.json", "models/rf2.schedule.json", "plots/train/rf2.csv",
                       "data/couplings/round-2"]}[stage]
    if stage == "couple":
        shutil.rmtree(ws / "data/couplings")
    first = run(ws, stage, tiny_overrides)
    assert first.returncode == 0, first.stderr
    files = [f for rel in outs for f in ([ws / rel] if (ws / rel).is_file() else sorted((ws / rel).glob("*")))]
    before = {f: sha(f) for f in files}
    for rel in outs:  # what dvc repro does to an unlocked stage's outputs before it reruns it
        shutil.rmtree(ws / rel) if (ws / rel).is_dir() else (ws / rel).unlink()
    again = run(ws, stage, tiny_overrides)
    assert again.returncode == 0, again.stderr
    assert "solved" not in again.stderr and "[rf2] step" not in again.stderr, again.stderr
    assert "finished before an interruption" in again.stderr
    assert {f: sha(f) for f in files} == before
    nxt = run(ws, "distill" if stage == "reflow" else "reflow", tiny_overrides)
    assert nxt.returncode == 0, nxt.stderr
    owner = (ws / ".rectflow/finished/STAGE").read_text().strip()
    assert owner != stage and not (ws / ".rectflow/finished" / f"round-{1 if stage == 'couple' else 2}").exists()


# ---- DVC's files torn by a kill while DVC rewrote them in place ------------------------------------


def test_a_torn_stage_lock_table_is_removed_only_when_no_live_dvc_guards_it(tmp_path):
    import fcntl

    from flows.dvcfiles import repair_rwlock

    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    table = tmp / "rwlock"
    assert repair_rwlock(tmp_path) is None  # none at all
    table.write_text('{"read": {}, "write": {}}')
    assert repair_rwlock(tmp_path) is None and table.is_file()  # a readable one is DVC's
    table.write_text('{"read": {"data": [{"pid": 1, "cm')
    with open(tmp / "rwlock.lock", "a") as guard:  # a live DVC is editing it: not touched
        fcntl.flock(guard.fileno(), fcntl.LOCK_EX)
        assert repair_rwlock(tmp_path) is None and table.is_file()
    note = repair_rwlock(tmp_path)
    assert note and "torn" in note and not table.exists()


def test_a_torn_dvc_lock_gets_the_kept_copy_back_and_without_one_is_refused(tmp_path):
    from flows.dvcfiles import DvcFileError, check_dvc_lock, keep_dvc_lock, repair_dvc_lock

    good = 'schema: "2.0"\nstages:\n  prepare:\n    cmd: rectflow stage prepare\n    outs:\n    - path: data\n'
    lock = tmp_path / "dvc.lock"
    lock.write_text(good[:40])
    assert repair_dvc_lock(tmp_path) is None  # no copy kept: the check refuses it, one line
    with pytest.raises(DvcFileError, match="^dvc.lock: stages.prepare"):
        check_dvc_lock(tmp_path)
    keep_dvc_lock(tmp_path)  # an unreadable dvc.lock is never kept
    assert not (tmp_path / ".rectflow" / "dvc.lock").exists()
    lock.write_text(good)
    keep_dvc_lock(tmp_path)
    assert repair_dvc_lock(tmp_path) is None  # readable: nothing to repair
    lock.write_text(good[:40])
    note = repair_dvc_lock(tmp_path)
    assert note and note.startswith("dvc.lock: stages.prepare") and lock.read_text() == good
    assert (tmp_path / ".rectflow" / "dvc.lock.damaged").read_text() == good[:40]
    check_dvc_lock(tmp_path)
