"""A small convolutional U-Net velocity network ``v(x, t)`` for image-shaped data ``(c, h, w)``.

Layout for ``channel_mult = (m_0, …, m_{L-1})`` (``L`` levels, base width ``C``)::

    x (B, c, h, w) ─ conv_in ─▶ (B, C·m_0, h, w)
    level i:  ResBlock → skip_i ─ stride-2 conv (except the last level) ─▶ next level
    middle:   ResBlock → [single-head self-attention] → ResBlock      at (h, w) / 2^(L−1)
    level i (reversed): concat skip_i → ResBlock → nearest ×2 upsample + conv (except level 0)
    GroupNorm → SiLU → conv_out (zero-initialised) ─▶ (B, c, h, w)

The time ``t`` ∈ [0, 1] (package convention: ``x_t = t·x1 + (1 − t)·x0``, sampling from 0 to 1) enters
through the package's sinusoidal embedding (:class:`rectflow.layers.SinusoidalEmbedding`), which scales
``t`` by 1000 so that its frequencies (periods 2π … 2π·10⁴) resolve [0, 1] as finely as DDPM's integer
steps, followed by a two-layer MLP; every ResBlock adds a per-channel projection of that embedding
after its first convolution. The zero-initialised output convolution makes a freshly built network
return exactly 0 everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rectflow.layers import Conditioning, IntervalEmbedding, SinusoidalEmbedding, interval, time_vector


def _groups(channels: int) -> int:
    """Largest group count ≤ 8 dividing ``channels`` (GroupNorm needs an exact division)."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv → (+ time) → GroupNorm → SiLU → dropout → conv, plus a skip.

    ``forward(x: (B, c_in, H, W), emb: (B, E)) -> (B, c_out, H, W)``; the skip is a 1×1 conv when
    ``c_in != c_out`` and the identity otherwise.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the ``H·W`` positions, with a residual connection.

    ``forward(x: (B, C, H, W)) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # (B, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv: ``(B, c_in, H, W) -> (B, c_out, 2H, 2W)``."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _check_config(shape: tuple[int, int, int], channels: int, channel_mult: Sequence[int], time_embed: int) -> None:
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"UNetVelocity: shape must be (c, h, w) with positive entries, got {tuple(shape)}")
    if channels <= 0 or not channel_mult or any(m <= 0 for m in channel_mult):
        raise ValueError(
            f"UNetVelocity: channels and every channel_mult entry must be positive, got channels={channels}, "
            f"channel_mult={tuple(channel_mult)}"
        )
    if time_embed <= 0 or time_embed % 2:
        raise ValueError(f"UNetVelocity: time_embed must be a positive even number, got {time_embed}")
    factor = 2 ** (len(channel_mult) - 1)
    _, h, w = shape
    if h % factor or w % factor:
        raise ValueError(
            f"UNetVelocity: h and w must be divisible by 2^(levels-1) = {factor} for {len(channel_mult)} levels "
            f"(channel_mult={tuple(channel_mult)}), got h={h}, w={w}"
        )


class UNetVelocity(nn.Module):
    """Velocity network ``v(x, t)`` for ``(c, h, w)`` data: ``(B, c, h, w), (B,) -> (B, c, h, w)``.

    Args:
        shape: ``(c, h, w)`` of one sample; ``h`` and ``w`` must be divisible by ``2^(len(channel_mult)−1)``.
        channels: base width ``C``; level ``i`` has ``C · channel_mult[i]`` channels.
        channel_mult: one multiplier per resolution level (``L`` levels, ``L − 1`` downsamplings).
        attention: single-head self-attention in the middle block (lowest resolution).
        time_embed: even width of the sinusoidal embedding of ``1000 · t``.
        dropout: dropout probability inside every ResBlock.
        average: an average-velocity network u(x, t, end) (MeanFlow): the time MLP takes
            ``[emb(t), emb(end − t)]``; ``end=None`` is end = t (the instantaneous velocity).
        classes: K > 0 for a conditional network v(x, t, y): a label embedding (K classes and the
            null class ∅) added to the time MLP's output; 0: unconditional (unchanged).
        guidance_input: also embed the guidance scale ``w`` (guidance distillation).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        attention: bool = True,
        time_embed: int = 64,
        dropout: float = 0.0,
        average: bool = False,
        classes: int = 0,
        guidance_input: bool = False,
    ) -> None:
        super().__init__()
        _check_config(shape, channels, channel_mult, time_embed)
        self.average_velocity = average
        self.shape = tuple(int(s) for s in shape)
        c = self.shape[0]
        widths = [channels * m for m in channel_mult]
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(
            IntervalEmbedding(time_embed) if average else SinusoidalEmbedding(time_embed),
            nn.Linear(time_embed, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.cond = Conditioning(classes, emb_dim, guidance_input) if classes else None
        self.classes, self.guidance_input = int(classes), bool(guidance_input and classes)
        self.conv_in = nn.Conv2d(c, widths[0], 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            self.down.append(ResBlock(prev, width, emb_dim, dropout))
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
            prev = width

        self.mid1 = ResBlock(prev, prev, emb_dim, dropout)
        self.attn = SelfAttention(prev) if attention else nn.Identity()
        self.mid2 = ResBlock(prev, prev, emb_dim, dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(ResBlock(prev + widths[i], widths[i], emb_dim, dropout))
            if i > 0:
                self.upsample.append(Upsample(widths[i], widths[i - 1]))
            prev = widths[i] if i == 0 else widths[i - 1]

        self.norm_out = nn.GroupNorm(_groups(widths[0]), widths[0])
        self.conv_out = nn.Conv2d(widths[0], c, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _time_vector(self, x: Tensor, t: Tensor | float, end: Tensor | float | None = None) -> Tensor:
        """Validate ``x`` and return ``t`` as a ``(B,)`` tensor on ``x``'s device, in ``x``'s dtype."""
        if x.ndim != 4:
            raise ValueError(
                f"UNetVelocity: x must have shape (B, c, h, w) = (B, {', '.join(map(str, self.shape))}), "
                f"got a rank-{x.ndim} tensor of shape {tuple(x.shape)}"
            )
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"UNetVelocity: x must have per-sample shape (c, h, w) = {self.shape}, got {tuple(x.shape[1:])}"
            )
        if self.average_velocity:
            return interval(t, end, x.shape[0], x, "UNetVelocity")
        if end is not None:
            raise ValueError("UNetVelocity: end is only for an average-velocity network (average=True)")
        return time_vector(t, x.shape[0], x, "UNetVelocity")

    def forward(self, x: Tensor, t: Tensor | float, end: Tensor | float | None = None, *,
                y: Tensor | None = None, w: Tensor | float | None = None) -> Tensor:
        """Velocity at ``(x, t)``.

        Args:
            x: ``(B, c, h, w)`` states.
            t: times in [0, 1], a scalar or ``(B,)``.
            end: (average-velocity networks only) the interval's end, a scalar or ``(B,)``.
            y: (conditional networks only) ``(B,)`` labels in [0, K]; None or K: the null class.
            w: (``guidance_input`` networks only) the guidance scale, a scalar or ``(B,)``.

        Returns:
            ``(B, c, h, w)`` velocity: ``x.dtype`` outside autocast, the autocast dtype inside it.
        """
        emb = self.time_mlp(self._time_vector(x, t, end))  # (B, 4C)
        if self.cond is not None:
            emb = emb + self.cond(y, w, x.shape[0], emb)
        elif y is not None or w is not None:
            raise ValueError("UNetVelocity: y: this network is unconditional (no classes); it takes no labels")
        h = self.conv_in(x)
        skips: list[Tensor] = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid2(self.attn(self.mid1(h, emb)), emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))
