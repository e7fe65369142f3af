"""Building blocks shared by the velocity networks (:mod:`rectflow.nets`, :mod:`rectflow.unet`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "Conditioning", "IntervalEmbedding", "LabelEmbedding", "SinusoidalEmbedding", "label_vector", "time_vector",
]


def time_vector(t: Tensor | float, batch: int, ref: Tensor, who: str = "") -> Tensor:
    """Broadcast ``t`` (scalar, ``()`` or ``(B,)``) to a ``(B,)`` tensor on ``ref``'s device/dtype;
    ValueError (prefixed with ``who``, the network) for any other shape."""
    t = torch.as_tensor(t, device=ref.device, dtype=ref.dtype)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{who + ': ' if who else ''}t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


class SinusoidalEmbedding(nn.Module):
    """``t`` in [0, 1], shape ``(B,)`` -> ``(B, dim)`` sin/cos features of ``scale·t`` (1000: DDPM's
    integer-step resolution, the flows')."""

    def __init__(self, dim: int, scale: float = 1000.0) -> None:
        super().__init__()
        self.scale = float(scale)
        if dim % 2:
            raise ValueError(f"time embedding width must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = self.scale * t[:, None].float() * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1).to(t.dtype)


class IntervalEmbedding(nn.Module):
    """The two times of an average-velocity network (MeanFlow): ``(B, 2)`` rows ``(s, e − s)`` ->
    ``(B, dim)``, ``[emb(s), emb(e − s)]`` (a :class:`SinusoidalEmbedding` of width ``dim / 2``
    each, of the raw times: scale 1), so that the network has the parameters of the flow of the
    same architecture. ``dim`` must be a multiple of 4.

    Not the flows' 1000·t: MeanFlow's target holds (e − s)·∂_s u, and features of 1000·s make that
    derivative ~1000× the velocity's, which feeds back through the target. Measured on pairs
    x1 = x0 + c (MLP 2×32, 400 Adam steps, lr 1e-3): one-step squared error 2.55 at scale 1000,
    3e-4 at scale 10, 1.5e-4 at scale 1."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"time_embed: an average-velocity network needs a multiple of 4, got {dim}")
        self.emb = SinusoidalEmbedding(dim // 2, scale)

    def forward(self, se: Tensor) -> Tensor:
        return torch.cat([self.emb(se[:, 0]), self.emb(se[:, 1])], dim=1)


def interval(t: Tensor, end: Tensor | float | None, batch: int, ref: Tensor, who: str = "") -> Tensor:
    """``(B, 2)`` rows ``(t, end − t)`` for :class:`IntervalEmbedding`; ``end=None`` means end = t
    (the instantaneous velocity u(z, t, t) = v(z, t))."""
    t = time_vector(t, batch, ref, who)
    d = torch.zeros_like(t) if end is None else time_vector(end, batch, ref, who) - t
    return torch.stack([t, d], dim=1)


def label_vector(y: Tensor | int | None, batch: int, classes: int, device: torch.device | str) -> Tensor:
    """``y`` as a ``(B,)`` int64 tensor of indices into a :class:`LabelEmbedding` of ``classes``
    classes: None is the null class (index ``classes``) for every row, a scalar is broadcast."""
    if y is None:
        return torch.full((batch,), classes, dtype=torch.long, device=device)
    y = torch.as_tensor(y, device=device)
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"y: expected integer class labels, got dtype {y.dtype}")
    y = y.long()
    if y.ndim == 0:
        return y.expand(batch)
    if y.shape != (batch,):
        raise ValueError(f"y: expected a scalar or shape ({batch},), got {tuple(y.shape)}")
    return y


class LabelEmbedding(nn.Module):
    """``(B,)`` labels in [0, K] (K: the null class ∅) -> ``(B, dim)`` learned vectors.

    The null row starts at zero, so a freshly built conditional network's unconditional branch
    is the unconditional network of the same weights."""

    def __init__(self, classes: int, dim: int) -> None:
        super().__init__()
        if classes < 1:
            raise ValueError(f"classes: must be ≥ 1, got {classes}")
        self.classes = int(classes)
        self.table = nn.Embedding(self.classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        with torch.no_grad():
            self.table.weight[self.classes].zero_()

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


class Conditioning(nn.Module):
    """What a conditional network adds to its time features: a learned embedding of the label
    (``classes`` classes plus the null class ∅ at index ``classes``, :class:`rectflow.guidance.LabelEmbedding`)
    and, with ``guidance_input``, a linear map of sinusoidal features of the guidance scale w
    (guidance distillation: one network for every scale).

    ``forward(y, w, batch, ref) -> (B, dim)``: ``y`` ``(B,)`` int or None (∅ for every row), ``w``
    scalar or ``(B,)`` (None: 1, the plain conditional field) in ``ref``'s dtype and device."""

    def __init__(self, classes: int, dim: int, guidance_input: bool = False) -> None:
        super().__init__()
        self.classes = int(classes)
        self.label = LabelEmbedding(self.classes, dim)
        self.scale = None
        if guidance_input:  # its output layer starts at zero: a flow given this input starts as the same flow for every w
            self.scale = nn.Sequential(SinusoidalEmbedding(dim, scale=1.0), nn.Linear(dim, dim))
            nn.init.zeros_(self.scale[1].weight)
            nn.init.zeros_(self.scale[1].bias)

    def forward(self, y: Tensor | None, w: Tensor | float | None, batch: int, ref: Tensor) -> Tensor:
        out = self.label(label_vector(y, batch, self.classes, ref.device)).to(ref.dtype)
        if self.scale is not None:
            out = out + self.scale(time_vector(1.0 if w is None else w, batch, ref)).to(ref.dtype)
        elif w is not None:
            raise ValueError("w: this network takes no guidance scale (guidance_input is off)")
        return out
