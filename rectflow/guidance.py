"""Class conditioning and classifier-free guidance (Ho & Salimans 2022; InstaFlow's recipe).

A conditional velocity network v(x, t, y) takes a class label y ∈ {0, …, K − 1} or the null class ∅,
stored as the extra index K of its label embedding (:class:`LabelEmbedding`). Pretraining replaces a
label by ∅ with probability ``p_uncond`` (:func:`drop_labels`), so one network holds both the
conditional and the unconditional field. Sampling at guidance scale w ≥ 0 uses (:class:`Guided`)::

    v_w(x, t, y) = v(x, t, ∅) + w·(v(x, t, y) − v(x, t, ∅))

w = 0 is the unconditional field, w = 1 the conditional one (both exactly: one forward of the
network, no arithmetic), any other w evaluates both branches in one batched forward of 2B rows.
NFE is counted in forwards of the network per sample (:attr:`Guided.forwards`: 1 or 2), so a guided
100-step Euler solve reports 200.

A student trained with the scale as an input (guidance distillation, Meng et al. 2023) takes w
itself (``guidance_input`` in its card) and serves every scale at one forward per step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rectflow.errors import InputError
from rectflow.layers import LabelEmbedding, label_vector

__all__ = ["Guided", "GuidanceError", "LabelEmbedding", "drop_labels", "label_vector"]


class GuidanceError(InputError, ValueError):
    """A label or guidance scale that the model cannot take (one line naming it)."""


def drop_labels(y: Tensor, p: float, classes: int, generator: torch.Generator) -> Tensor:
    """``y`` ``(B,)`` with each label replaced by the null class (index ``classes``) with probability
    ``p`` (independently, from ``generator``, on the CPU: the draw is part of a checkpoint)."""
    if p <= 0.0:
        return y
    drop = torch.rand(y.shape[0], generator=generator) < p
    return torch.where(drop.to(y.device), torch.full_like(y, classes), y)


class Guided:
    """The guided velocity of a conditional network for fixed labels, as a solver's ``v(z, t)``.

    ``model``: a network called ``model(z, t[, end], y=labels)`` (``y=None``: ∅); ``y`` ``(B,)``
    labels of the rows to be solved (None: unconditional); ``w``: the guidance scale, one for every
    row or ``(B,)``, one per row (pairs made at many scales, ``distill.guidance_input``). For a
    model with the scale as input (``model.guidance_input``) the scale is passed to it
    (``model(z, t, y=y, w=w)``) at one forward per call.
    """

    def __init__(self, model: nn.Module, y: Tensor | None, w: float | Tensor = 1.0) -> None:
        low = float(w.min()) if isinstance(w, Tensor) else float(w)
        if not low >= 0:
            raise GuidanceError(f"guidance: the scale w must be ≥ 0, got {low:g}")
        self.model, self.y = model, y
        self.w: float | Tensor = w if isinstance(w, Tensor) else float(w)
        self.average_velocity = bool(getattr(model, "average_velocity", False))
        self.takes_w = bool(getattr(model, "guidance_input", False))
        self.both = y is not None and not self.takes_w and (isinstance(w, Tensor) or self.w not in (0.0, 1.0))
        self.forwards = 2 if self.both else 1
        self._y2: Tensor | None = None

    def __call__(self, z: Tensor, t: Tensor, end: Tensor | None = None) -> Tensor:
        args = (z, t) if end is None else (z, t, end)
        if self.y is None:
            return self.model(*args)
        if self.takes_w:
            return self.model(*args, y=self.y, w=self.w)
        if not self.both:
            return self.model(*args, y=self.y if self.w == 1.0 else None)  # w is 0 or 1 here
        b = z.shape[0]
        if self._y2 is None or self._y2.shape[0] != 2 * b:
            null = torch.full_like(self.y, int(getattr(self.model, "classes")))
            self._y2 = torch.cat([self.y, null])
        out = self.model(*(torch.cat([a, a]) for a in args), y=self._y2)
        cond, uncond = out[:b], out[b:]
        w = self.w.reshape(-1, *([1] * (out.ndim - 1))).to(out.dtype) if isinstance(self.w, Tensor) else self.w
        return uncond + w * (cond - uncond)
