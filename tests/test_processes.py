"""Nothing a run starts outlives it (#15 kind 6): `kill -9` of `rectflow run` mid-stage leaves no
process behind (its Prefect server, DVC, the stage), found by a marker in their environment."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.support.processes import marked as _marked
from tests.workspace import BIN, clone_workspace, env

pytestmark = pytest.mark.slow


def test_kill_9_of_run_leaves_no_process(tmp_path):
    from tests.conftest import TINY

    ws = clone_workspace(tmp_path / "ws", [*TINY, "pretrain.steps=100000"])
    marker = f"RECTFLOW_TEST_MARK={uuid.uuid4().hex}"
    e = env(RECTFLOW_TEST_MARK=marker.split("=", 1)[1], PREFECT_HOME=str(tmp_path / "prefect"))
    e.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([str(BIN / "rectflow"), "run"], cwd=ws, env=e, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    deadline = time.monotonic() + 240
    assert run.stdout is not None
    for line in run.stdout:  # until pretrain runs: Prefect server, DVC and the stage all up
        seen.append(line)
        if "> rectflow stage pretrain" in line or time.monotonic() > deadline:
            break
    assert any("> rectflow stage pretrain" in s for s in seen), "".join(seen[-40:])
    time.sleep(3)  # the stage is importing torch / training
    assert len(_marked(marker)) >= 3  # the run, its Prefect server, DVC, the stage ...
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    end = time.monotonic() + 20
    names: dict[int, bytes] = {}
    while _marked(marker) and time.monotonic() < end:
        for pid in _marked(marker):
            try:
                names.setdefault(pid, Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200])
            except OSError:
                pass
        time.sleep(0.25)
    left = _marked(marker)
    for pid in left:  # never leave them for the next test, whatever happens
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert left == [], [names.get(p) for p in left]
