"""A tiny trained workspace (data/prepared + models/rf1), built once per test session in-process
with :func:`tasks.runner.run_stage`, and copied for each test that needs one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, TINY

# TINY, with a shorter pretrain: these tests are about where pairs go and how training is run,
# not about the quality of rf1.
OVERRIDES = [*TINY, "pretrain.steps=60", "pretrain.checkpoint_every=40"]

_BASE: dict[str, Path] = {}


def trained_workspace(factory: pytest.TempPathFactory) -> Path:
    """The session's base workspace (do not modify it: copy it with :func:`copy_workspace`)."""
    if "ws" not in _BASE:
        from tasks.runner import run_stage

        ws = factory.mktemp("trained")
        shutil.copy(ROOT / "params.yaml", ws / "params.yaml")
        for stage in ("prepare", "pretrain"):
            run_stage(stage, ws / "params.yaml", OVERRIDES, root=ws)
        _BASE["ws"] = ws
    return _BASE["ws"]


def copy_workspace(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".rectflow"))
    return dst


@pytest.fixture
def ws(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A copy of the session's trained workspace for one test (import the fixture by name)."""
    return copy_workspace(trained_workspace(tmp_path_factory), tmp_path / "ws")


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``rectflow ARGS`` through the console script's own ``main()``: (exit status, stdout, stderr)."""
    import sys

    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["rectflow", *args])
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]
