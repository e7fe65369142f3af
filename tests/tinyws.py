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


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]
