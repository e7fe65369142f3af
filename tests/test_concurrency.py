"""Two runs in one workspace at once: the workspace lock (rectflow/lock.py) makes the second refuse
with one line naming the holder (exit 2) or, with RECTFLOW_LOCK_WAIT=1, wait its turn; either way
every output is sound. Real processes, real kills, no mocks."""

from __future__ import annotations

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

from rectflow.lock import ENV_HELD, LockError, lock_path, workspace_lock

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RECTFLOW_THREADS="1")
ENV.pop(ENV_HELD, None)
ENV.pop("RECTFLOW_LOCK_WAIT", None)
STEPS = 1500
LONG = [f"pretrain.steps={STEPS}", "pretrain.checkpoint_every=500"]


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def start(ws: Path, args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ws, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def prepared(tmp_path_factory, tiny_overrides, tmp_path) -> Path:
    """A fresh copy of a workspace where only prepare has run (the prepared base is built once)."""
    shared = tmp_path_factory.getbasetemp() / "shared-base-prepared"
    if not (shared / ".complete").is_file():
        shutil.rmtree(shared, ignore_errors=True)
        shared.mkdir()
        shutil.copy(ROOT / "params.yaml", shared / "params.yaml")
        r = subprocess.run([sys.executable, "-m", "flows.cli", "stage", "prepare", *sets(tiny_overrides)],
                           cwd=shared, env=ENV, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        (shared / ".complete").touch()
    ws = tmp_path / "ws"
    shutil.copytree(shared, ws, ignore=shutil.ignore_patterns(".complete"))
    return ws


def assert_model_sound(ws: Path, sha: str) -> None:
    from rectflow.models import load_model

    data = (ws / "models" / "rf1.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha
    card = json.loads((ws / "models" / "rf1.json").read_text())
    assert card["meta"]["sha256"] == sha
    load_model(ws / "models" / "rf1")  # weights fit the architecture, sha256 checks out
    assert json.loads((ws / "metrics" / "pretrain.json").read_text())["sha256"] == sha
    assert not list(ws.rglob("*.tmp")), "no temporary file may survive"
    assert not lock_path(ws).exists(), "the lock file goes with its holder"


def test_two_pretrains_at_once_one_refuses_naming_the_holder(prepared, tiny_overrides):
    args = ["stage", "pretrain", *sets(tiny_overrides + LONG)]
    procs = [start(prepared, args, ENV), start(prepared, args, ENV)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], f"expected one success and one refusal, got {codes}: {[o[1][-800:] for o in outs]}"
    win = 0 if procs[0].returncode == 0 else 1
    winner, loser = procs[win], procs[1 - win]
    err = [line for line in outs[1 - win][1].splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("rectflow: error: workspace "), outs[1 - win][1]
    assert f"in use by pid {winner.pid} (rectflow stage pretrain" in err[0]
    assert outs[1 - win][0] == ""  # the refused run printed no record and wrote nothing
    summary = json.loads(outs[win][0])
    assert summary["steps_run"] == STEPS and summary["resumed_from"] == 0
    assert_model_sound(prepared, summary["sha256"])
    assert loser.pid != winner.pid


def test_with_lock_wait_both_finish_one_after_the_other(prepared, tiny_overrides):
    args = ["stage", "pretrain", *sets(tiny_overrides + LONG)]
    env = ENV | {"RECTFLOW_LOCK_WAIT": "1"}
    procs = [start(prepared, args, env), start(prepared, args, env)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-800:] for o in outs]
    waited = [i for i, (_, err) in enumerate(outs) if "waiting for it to finish" in err]
    assert len(waited) == 1, "exactly one run queued behind the other"
    other = procs[1 - waited[0]]
    assert f"in use by pid {other.pid} (rectflow stage pretrain" in outs[waited[0]][1]
    s1, s2 = (json.loads(out) for out, _ in outs)
    # Each trained from scratch on its own (no interleaving: no resume from the other's checkpoint),
    # and the same seed made the same bytes.
    assert s1["steps_run"] == s2["steps_run"] == STEPS and s1["resumed_from"] == s2["resumed_from"] == 0
    assert s1["sha256"] == s2["sha256"]
    assert_model_sound(prepared, s1["sha256"])


def test_nested_runs_do_not_deadlock_but_strangers_are_refused(prepared, tiny_overrides):
    """``rectflow run`` → ``dvc repro`` → ``rectflow stage``: children inherit RECTFLOW_LOCK_HELD."""
    args = ["stage", "prepare", *sets(tiny_overrides)]
    with workspace_lock(prepared, wait=False):
        assert os.environ[ENV_HELD] == str(prepared.resolve())
        child = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=prepared,
                               env=dict(os.environ, RECTFLOW_THREADS="1"), capture_output=True, text=True, timeout=240)
        assert child.returncode == 0, child.stderr
        stranger = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=prepared, env=ENV,
                                  capture_output=True, text=True, timeout=240)
        assert stranger.returncode == 2
        assert f"in use by pid {os.getpid()}" in stranger.stderr, stranger.stderr
        assert len(stranger.stderr.strip().splitlines()) == 1
    assert ENV_HELD not in os.environ
    assert not lock_path(prepared).exists()


def test_sigkilled_holder_never_leaves_a_stale_lock(tmp_path):
    secret_args = ["--set", "tracking.mlflow_uri=http://bob:hunter2@mlflow:5000", "--set", "x.api_token=hunter3"]
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from rectflow.lock import workspace_lock\n"
         f"with workspace_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(120)", *secret_args],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockError, match=rf"in use by pid {holder.pid} \(") as refused:
        with workspace_lock(tmp_path, wait=False):
            pass
    # The holder's command line is shown, its secrets are not (nor are they in the lock file).
    assert "mlflow:5000" in str(refused.value) and "hunter" not in str(refused.value)
    assert "hunter" not in lock_path(tmp_path).read_text()
    t0 = time.monotonic()
    with pytest.raises(LockError, match="after waiting"):
        with workspace_lock(tmp_path, wait=True, timeout=0.3):
            pass
    assert time.monotonic() - t0 < 10
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path(tmp_path).exists()  # the dead holder's file is still there...
    with workspace_lock(tmp_path, wait=False):  # ...but the kernel released its lock
        assert lock_path(tmp_path).read_text().split("\n")[0] == str(os.getpid())
    assert not lock_path(tmp_path).exists()


def test_a_waiter_takes_over_when_the_holder_is_killed(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from rectflow.lock import workspace_lock\n"
         f"with workspace_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(120)"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waiter = subprocess.Popen(
        [sys.executable, "-c",
         "from rectflow.lock import workspace_lock\n"
         f"with workspace_lock({str(tmp_path)!r}, wait=True, timeout=60):\n    print('got it', flush=True)"],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = waiter.stderr.readline()  # blocks until the waiter is queued
    assert f"in use by pid {holder.pid}" in line and "waiting" in line, line
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out.strip() == "got it", err
    assert not lock_path(tmp_path).exists()
