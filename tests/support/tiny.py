"""The tiny pipeline of the tests: ``--set`` overrides that make every stage take seconds on two
CPU cores. One list, used by ``tests/conftest.py`` and by ``python -m benchmarks.overhead --quick``."""

from __future__ import annotations

__all__ = ["TINY"]

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
