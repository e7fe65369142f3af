"""Test helpers: a clean git+DVC workspace copied from this checkout, and CLI runners."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clone_workspace(dest: Path, overrides: list[str] | None = None) -> Path:
    """Copy the tracked and untracked-not-ignored files of this checkout (what a clean clone of the
    current work holds) into ``dest``, apply ``overrides`` to its params.yaml, and commit it."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if overrides:
        from flows.pipeline import record_overrides
        from rectflow.dvcyaml import write
        from rectflow.params import load_params

        record_overrides(dest / "params.yaml", list(overrides))
        write(load_params(dest / "params.yaml"), dest)  # the DAG of these params (reflow.rounds ...)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "workspace"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true",
         "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"}
    # hermetic children: nothing a previous test (or mlflow.set_tracking_uri, which writes
    # MLFLOW_TRACKING_URI into os.environ) left behind may redirect their tracking or storage
    for key in list(e):
        if key == "RECTFLOW_LOCK_HELD" or key.startswith(("MLFLOW_TRACKING", "MLFLOW_S3", "RECTFLOW_S3_")):
            e.pop(key)
    return e | extra


def run(cmd: list[str], cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def rectflow(*args: str, cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return run([str(BIN / "rectflow"), *args], cwd, timeout, **extra_env)


def dvc(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], cwd, timeout)
