"""Batch sources for 1-rectified flow: independent pairs, or exact minibatch OT pairs.

- ``independent``: X0 ~ π0 and X1 ~ π1 drawn afresh and independently every batch (Liu et al. 2022):
  never a fixed permutation per epoch.
- ``minibatch_ot``: the OT-CFM recipe (Tong et al. 2023, torchcfm): draw a batch from each side, solve
  exact OT with squared-Euclidean cost (POT ``emd``), and pair X0[i] with X1[σ(i)].

And for distillation from a trained one-step model (``distill.teacher_model``):

- :class:`TeacherPairs`: fresh X0 ~ π0 every batch and X1 = T(X0), the one-step output of the model T
  (online knowledge distillation: the student never sees the same pair twice).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rectflow.data import Distribution
from rectflow.solvers import solve

__all__ = ["IndependentPairs", "TeacherPairs", "ot_permutation"]


def ot_permutation(x0: Tensor, x1: Tensor) -> Tensor:
    """σ with Σ_i ‖x0[i] − x1[σ(i)]‖² minimal (exact OT between two equal-size uniform batches)."""
    import ot

    a = x0.reshape(len(x0), -1).double().cpu().numpy()
    b = x1.reshape(len(x1), -1).double().cpu().numpy()
    cost = ot.dist(a, b)  # squared Euclidean
    plan = ot.emd(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), cost, numItermax=10_000_000)
    return torch.from_numpy(plan.argmax(1)).to(x1.device)


class IndependentPairs:
    """Fresh (x0, x1) pairs every call from π0 and π1, with its own seeded generator (checkpointed)."""

    def __init__(
        self, source: Distribution, target: Distribution, seed: int, device: torch.device | str = "cpu",
        coupling: str = "independent", hflip: bool = False, rank: int = 0,
    ) -> None:
        if source.dim != target.dim:
            raise ValueError(f"source dimension {source.shape} differs from target dimension {target.shape}")
        self.source, self.target, self.device = source, target, torch.device(device)
        self.coupling, self.hflip = coupling, hflip
        # Data parallel: each rank its own stream (rank 0's is the single-process one). Under
        # minibatch_ot each rank pairs its own share of the batch.
        self.gen = torch.Generator().manual_seed(seed * 1000 + 5 + 7919 * rank)

    def next_batch(self, batch_size: int) -> tuple[Tensor, ...]:
        """``(x0, x1)`` ``(B, *shape)``; a labelled target (a conditional run) adds ``y`` ``(B,)``:
        X1 drawn with its label, X0 from the source's rows of that class when the source is
        labelled too (class-conditional transport), else from π0 as always."""
        if not self.target.labelled:
            x0 = self.source.sample(batch_size, self.gen).reshape(batch_size, *self.target.shape)
            x1 = self.target.sample(batch_size, self.gen)
            y = None
        else:
            x1, y = self.target.sample_labelled(batch_size, self.gen)
            x0 = self.source.sample_of(y, self.gen).reshape(batch_size, *self.target.shape)
        if self.hflip and x1.ndim == 4:
            flip = torch.rand(batch_size, generator=self.gen) < 0.5
            x1 = torch.where(flip[:, None, None, None], x1.flip(-1), x1)
        if self.coupling == "minibatch_ot":
            perm = ot_permutation(x0, x1).cpu()
            x1 = x1[perm]
            y = None if y is None else y[perm]  # a label travels with its X1
        out = (x0.to(self.device, non_blocking=True), x1.to(self.device, non_blocking=True))
        return out if y is None else (*out, y.to(self.device, non_blocking=True))

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])


class TeacherPairs:
    """Pairs from a trained one-step model T: X0 ~ π0 drawn afresh every call and X1 = T(X0) =
    X0 + u_T(X0, 0) (one Euler step of T: its velocity at t = 0, or its average over [0, 1] for a
    MeanFlow model), computed without gradients, in bf16 autocast when ``precision`` is ``bf16``
    (the state and the returned X1 stay fp32). The student then regresses X1 − X0 on fresh noise
    every batch, instead of a fixed set of ODE pairs that it can over-fit. Seeded generator of its
    own, checkpointed; rank r of a data-parallel run draws its own stream."""

    def __init__(
        self, source: Distribution, teacher: nn.Module, shape: tuple[int, ...], seed: int,
        device: torch.device | str = "cpu", precision: str = "fp32", rank: int = 0,
    ) -> None:
        if source.dim != int(np.prod(shape)):
            raise ValueError(f"source dimension {source.shape} differs from the teacher's shape {tuple(shape)}")
        self.source, self.teacher, self.shape = source, teacher.eval(), tuple(shape)
        self.device, self.precision = torch.device(device), precision
        self.gen = torch.Generator().manual_seed(seed * 1000 + 11 + 7919 * rank)

    def next_batch(self, batch_size: int) -> tuple[Tensor, ...]:
        """``(x0, x1)`` ``(B, *shape)`` on the device, x1 the teacher's one-step output for x0."""
        x0 = self.source.sample(batch_size, self.gen).reshape(batch_size, *self.shape)
        x0 = x0.to(self.device, non_blocking=True)
        # no_grad rather than inference_mode: x1 enters the student's loss, which autograd records
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                             enabled=self.precision == "bf16"):
            x1 = solve(self.teacher, x0, "euler", 1).x
        return x0, x1.float()

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
