"""Building blocks shared by the velocity networks (:mod:`rectflow.nets`, :mod:`rectflow.unet`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalEmbedding", "time_vector"]


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
    """``t`` in [0, 1], shape ``(B,)`` -> ``(B, dim)`` sin/cos features of ``1000·t``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding width must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        arg = 1000.0 * t[:, None].float() * self.freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=1).to(t.dtype)
