"""The crash harness (#15): SIGKILL a tiny ``rectflow run`` at seeded points spread over every
stage, rerun after each kill, and check what a user relies on after a crash:

- the final outputs (prepared data, every model's weights and step schedules, every coupling
  round's shards and manifest, the evaluation's figures) are byte-identical to an uninterrupted run's;
- nothing finished is computed again, counted from what each rerun prints against what was on disk
  when the kill landed: no stage DVC had locked is run again, no finished model is trained again,
  training resumes exactly at its last checkpoint's step, no shard a manifest lists is solved again;
- no process of a killed run is left behind (found by a marker in their environment);
- afterwards ``dvc status`` is clean, ``dvc.lock`` is valid YAML that DVC reads, ``mlflow.db``
  passes SQLite's integrity check, and no MLflow run is left RUNNING (the next run marks those of a
  killed run KILLED).

The kill points are drawn by ``random.Random(SEED)``: for each stage, which of its progress lines
(or its ``Running stage`` line) the kill follows and a delay after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import re
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support.processes import marked
from tests.support.tiny import TINY
from tests.workspace import BIN, clone_workspace, dvc, env

pytestmark = pytest.mark.slow

SEED = 20261201
# Deterministic end to end: quantize's int8 and int4 backends are otherwise chosen by timing them.
PARAMS = [*TINY, "quantize.backend=dynamic", "quantize.int4.backend=dequant"]
# Kills per stage (12 in all): more where there is more to lose.
KILLS = {"resolve": 1, "prepare": 1, "pretrain": 2, "couple": 2, "reflow": 2, "distill": 2, "quantize": 1,
         "evaluate": 1}
PROGRESS = re.compile(r"^\[[\w-]+\]\s+\S")  # a stage's own line: "[rf1] step 50/150 …", "[evaluate]   rf1 …"
STEP = re.compile(r"^\[(\w[\w-]*)\] step (\d+)/(\d+) ")
SOLVED = re.compile(r"^\[couple\] round (\d+): shard (\d+)/\d+ solved")
RUNNING = re.compile(r"^Running stage '(\w+)'")


@dataclass(frozen=True)
class KillPoint:
    stage: str
    after_lines: int  # progress lines of that stage (0: right after DVC's "Running stage")
    delay: float  # seconds after that line


def kill_points(seed: int = SEED) -> list[KillPoint]:
    rng = random.Random(seed)
    most = {"resolve": 0, "prepare": 0, "pretrain": 5, "couple": 2, "reflow": 6, "distill": 3, "quantize": 1,
            "evaluate": 8}
    return [KillPoint(stage, rng.randint(0, most[stage]), round(rng.uniform(0.0, 0.6), 2))
            for stage, n in KILLS.items() for _ in range(n)]


def outputs(ws: Path) -> dict[str, str]:
    """sha256 of every final output that must not depend on crashes."""
    out = {}
    for pattern in ("data/prepared/*.npy", "models/*.safetensors", "models/*.schedule.json",
                    "data/couplings/round-*/*.parquet", "data/couplings/round-*/manifest.json"):
        for p in sorted(ws.glob(pattern)):
            out[str(p.relative_to(ws))] = hashlib.sha256(p.read_bytes()).hexdigest()
    rows = json.loads((ws / "metrics/eval.json").read_text())["rows"]
    out["metrics/eval.json rows"] = json.dumps(
        [{k: v for k, v in r.items() if k not in ("latency_ms", "latency_b1_ms")} for r in rows], sort_keys=True)
    return out


@dataclass
class Finished:
    """What was finished on disk when a kill landed."""

    locked: set[str]  # stages in dvc.lock
    models: set[str]  # models saved (models/NAME.safetensors or the copy kept in .rectflow/finished)
    checkpoints: dict[str, int]  # model -> step of its last checkpoint
    shards: set[tuple[int, int]]  # (round, 1-based shard) listed in a manifest (staging or final)


def finished(ws: Path) -> Finished:
    import torch

    lock = ws / "dvc.lock"
    locked = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {})) if lock.is_file() else set()
    models = {p.name.split(".")[0] for d in (ws / "models", ws / ".rectflow/finished") if d.is_dir()
              for p in d.glob("*.safetensors")}
    checkpoints = {}
    for ck in (ws / ".rectflow/checkpoints").glob("*/last.pt"):
        checkpoints[ck.parent.name] = int(torch.load(ck, map_location="cpu", weights_only=True)["step"])
    shards = set()
    for man in [*(ws / ".rectflow/staging").rglob("manifest.json"), *ws.glob("data/couplings/round-*/manifest.json"),
                *ws.glob(".rectflow/finished/round-*/manifest.json")]:
        doc = json.loads(man.read_text())
        k = int(doc.get("round") or re.search(r"(\d+)$", man.parent.name).group(1))
        shards |= {(k, i + 1) for i, e in enumerate(doc.get("shards") or []) if e}
    return Finished(locked, models, checkpoints, shards)


def check_nothing_redone(before: Finished, lines: list[str]) -> list[str]:
    """What a rerun's output shows it computed again of what ``before`` had finished."""
    bad, first_step = [], {}
    for line in lines:
        if (m := RUNNING.match(line)) and m.group(1) in before.locked:
            bad.append(f"stage {m.group(1)} was locked by DVC yet ran again")
        if m := STEP.match(line):
            name, step = m.group(1), int(m.group(2))
            first_step.setdefault(name, step)
            if name in before.models:
                bad.append(f"{name} was finished yet trained again ({line.strip()})")
        if (m := SOLVED.match(line)) and (int(m.group(1)), int(m.group(2))) in before.shards:
            bad.append(f"round {m.group(1)} shard {m.group(2)} was finished yet solved again")
    for name, step in first_step.items():
        if name in before.checkpoints and step <= before.checkpoints[name]:
            bad.append(f"{name} resumed at step {step}, at or before its checkpoint's {before.checkpoints[name]}")
    return bad


class Run:
    """``rectflow run`` in its own process group, its merged output read line by line."""

    def __init__(self, ws: Path, environ: dict[str, str]):
        self.proc = subprocess.Popen([str(BIN / "rectflow"), "run"], cwd=ws, env=environ, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.ended = False  # the output reached its end
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def next_line(self, deadline: float) -> str | None:
        """The next line (None once the output ends); fails the test past the deadline."""
        if self.ended:
            return None
        try:
            line = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            alive = self.proc.poll() is None
            self.kill()
            pytest.fail(f"rectflow run went silent ({'still running' if alive else 'ended, its output still open'}):\n"
                        + "".join(self.lines[-30:]))
        if line is None:
            self.ended = True
        else:
            self.lines.append(line)
        return line

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def drain(self) -> None:
        while self.next_line(time.monotonic() + 60) is not None:
            pass


def run_until(run: Run, point: KillPoint, timeout: float = 400) -> bool:
    """Follow ``run`` until ``point`` (the kill's stage is running, after that many of its progress
    lines and the delay) and SIGKILL its process group; False if the run ended first."""
    deadline = time.monotonic() + timeout
    stage, seen = None, 0
    while (line := run.next_line(deadline)) is not None:
        if m := RUNNING.match(line):
            stage, seen = m.group(1), 0
            if stage == point.stage and point.after_lines == 0:
                break
        elif stage == point.stage and PROGRESS.match(line):
            seen += 1
            if seen >= point.after_lines:
                break
        elif stage is not None and stage != point.stage and _past(stage, point.stage):
            break  # the stage was skipped (finished before) or ended early: kill where the run is now
    else:
        return False
    time.sleep(point.delay)
    run.kill()
    return True


def _past(current: str, target: str) -> bool:
    order = list(KILLS)
    return current in order and order.index(current) > order.index(target)


def test_sigkill_anywhere_then_rerun_gives_the_uninterrupted_outputs(tmp_path):
    points = kill_points()
    assert len(points) >= 10 and {p.stage for p in points} == set(KILLS)
    base_env = env(RECTFLOW_THREADS="1", PREFECT_HOME=str(tmp_path / "prefect"))
    base_env.pop("PREFECT_API_URL", None)

    reference = clone_workspace(tmp_path / "reference", PARAMS)
    r = subprocess.run([str(BIN / "rectflow"), "run"], cwd=reference, env=base_env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = outputs(reference)

    ws = clone_workspace(tmp_path / "crashed", PARAMS)
    problems, landed = [], []
    for point in points:
        before = finished(ws)
        marker = uuid.uuid4().hex
        run = Run(ws, base_env | {"RECTFLOW_TEST_MARK": marker})
        killed = run_until(run, point)
        if not killed:
            run.drain()
            assert run.proc.wait(60) == 0, "".join(run.lines[-40:])
        problems += [f"before kill at {point}: {p}" for p in check_nothing_redone(before, run.lines)]
        landed.append((point, killed, next((m.group(1) for line in reversed(run.lines)
                                            if (m := RUNNING.match(line))), None)))
        end = time.monotonic() + 20
        while marked(marker) and time.monotonic() < end:
            time.sleep(0.25)
        left = marked(marker)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"processes left after the kill at {point}: {left}"
    stages_hit = {stage for _, killed, stage in landed if killed}
    where = "\n".join(f"{p}: {'killed in ' + str(stage) if killed else 'ran to the end'}" for p, killed, stage in landed)
    assert len([1 for _, killed, _ in landed if killed]) >= 10, where
    assert {"pretrain", "couple", "reflow", "distill", "evaluate"} <= stages_hit, where

    before = finished(ws)
    final = Run(ws, base_env | {"RECTFLOW_TEST_MARK": uuid.uuid4().hex})
    final.drain()
    assert final.proc.wait(60) == 0, "".join(final.lines[-40:])
    problems += [f"final run: {p}" for p in check_nothing_redone(before, final.lines)]
    assert not problems, problems

    assert outputs(ws) == expected
    status = dvc("status", cwd=ws)
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout + status.stderr
    assert yaml.safe_load((ws / "dvc.lock").read_text())["stages"].keys() >= set(KILLS)
    with sqlite3.connect(ws / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0] >= 1
        # the killed runs' MLflow runs were marked KILLED by the next run, none is left RUNNING
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'").fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'KILLED'").fetchone()[0] >= 1
