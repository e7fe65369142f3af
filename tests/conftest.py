"""Shared fixtures: a repository root, a tiny params document, environment hygiene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

# A pipeline small enough for tests: seconds per stage on two CPU cores.
TINY = [
    "data.n_train=4000", "data.n_test=600",
    "model.hidden=64", "model.depth=2",
    "pretrain.steps=150", "pretrain.batch_size=256", "pretrain.checkpoint_every=50", "pretrain.log_every=25",
    "couple.n_pairs=1200", "couple.shard_size=400", "couple.batch_size=400", "couple.solver=euler", "couple.steps=20",
    "reflow.steps=100", "reflow.batch_size=256", "reflow.checkpoint_every=50", "reflow.log_every=25",
    "distill.steps=100", "distill.batch_size=256", "distill.checkpoint_every=50", "distill.log_every=25",
    "evaluate.n_samples=300", "evaluate.latency_batch=128",
    "evaluate.grid=[{models: flows, solver: euler, steps: [1, 4]}, {models: flows, solver: euler, steps: [2], "
    "schedule: bellman}, {models: students, solver: euler}]",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _restore_tracking_env():
    """mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into os.environ: undo it after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
