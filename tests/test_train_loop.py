"""The training loop's learning-rate schedule, as run (history) and across a resume."""

from __future__ import annotations

import pytest
import torch

from rectflow.config import PretrainParams
from rectflow.data import Distribution, generate_2d
from rectflow.nets import MLPVelocity
from rectflow.sources import IndependentPairs
from rectflow.train import learning_rate, train, weights_sha256


class Crash(RuntimeError):
    pass


class CrashingPairs(IndependentPairs):
    """Independent pairs that raise on the ``crash_at``-th batch (a crash in the middle of a run)."""

    def __init__(self, *a, crash_at: int | None = None, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls, self.crash_at = 0, crash_at

    def next_batch(self, batch_size):
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash(f"batch {self.calls}")
        return super().next_batch(batch_size)


def _run(ckpt_dir, cfg, crash_at=None):
    target = Distribution((2,), torch.from_numpy(generate_2d("moons", 2000, 0)))
    torch.manual_seed(0)
    model = MLPVelocity((2,), 16, 2, 8)
    batches = CrashingPairs(Distribution((2,)), target, 0, crash_at=crash_at)
    res = train(model, batches, cfg, name="t", seed=0, checkpoint_dir=ckpt_dir, run_fingerprint="f")
    return model, res


def test_cosine_schedule_is_what_the_loop_uses_and_survives_a_resume(tmp_path):
    cfg = PretrainParams(steps=60, batch_size=64, warmup=10, lr=1e-2, lr_schedule="cosine",
                         log_every=5, checkpoint_every=20)
    full, res = _run(tmp_path / "a", cfg)
    assert [h["lr"] for h in res.history] == pytest.approx([learning_rate(cfg, h["step"] - 1) for h in res.history])
    assert res.history[-1]["lr"] < 1e-4 < res.history[2]["lr"]
    with pytest.raises(Crash):  # dies at step 46, after the checkpoint of step 40
        _run(tmp_path / "b", cfg, crash_at=46)
    resumed, res_b = _run(tmp_path / "b", cfg)
    assert res_b.resumed_from == 40
    assert [h["lr"] for h in res_b.history] == pytest.approx([h["lr"] for h in res.history])
    assert weights_sha256(resumed) == weights_sha256(full)
