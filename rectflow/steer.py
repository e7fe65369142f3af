"""Steering a rectified flow towards observed pixels: FlowChef-style inpainting, gradient-free.

Given images ``y`` ``(n, c, h, w)`` of which only the pixels where ``mask`` is 1 are known, fill in
the rest with a saved flow (or one-step student) without training anything (FlowChef, "Steering
Rectified Flow Models in the Vector Field"; ``../shared/FIELD.md``, "Running the flow backwards").

**Mask convention.** ``mask`` is 1 where a pixel is observed (known), 0 where it must be filled;
``(c, h, w)`` or ``(h, w)`` (one mask for every image; ``(h, w)`` is broadcast over channels), or
``(n, c, h, w)`` / ``(n, h, w)`` (one per image). :func:`check_mask` turns any of them into
``(1 or n, c, h, w)`` float 0/1 and names the culprit of anything else.

**Flow (Euler, t: 0 → 1 on the uniform grid t_0 = 0 < … < t_K = 1, h_i = t_{i+1} − t_i).** At each
step, with M the mask::

    v_i   = v(x_i, t_i)                                   (one forward, no gradient)
    x̂1    = x_i + (1 − t_i)·v_i                          (the straight-line estimate of x1)
    C     = ‖M ⊙ (x̂1 − y)‖²,   ∇C ≈ 2·M ⊙ (x̂1 − y)     (∂x̂1/∂x_i taken as I: v_i held fixed)
    x_i'  = x_i − η_i·∇C/2 = x_i − η_i·M ⊙ (x̂1 − y)
    x_{i+1} = x_i' + h_i·v_i

Step sizes: η_i = ``strength`` for every step but the last, η_{K−1} = 1. With η = 1 the update moves
x̂1 exactly onto y on the known region; at the last step 1 − t_{K−1} = h_{K−1}, so x_K = x̂1' and the
un-pasted result already equals y there (up to rounding). A mask of zeros leaves every x_i' = x_i:
plain Euler sampling, bit for bit. NFE = K.

**One-step student** (x1 = z0 + v(z0, 0)): K corrections of the noise, then the final forward::

    x̂1 = z + v(z, 0);   z ← z − η·M ⊙ (x̂1 − y)      (K times, from z = z0)
    x  = z + v(z, 0)                                 NFE = K + 1

Both return the completion with the known pixels replaced by y (``x = M ⊙ y + (1 − M) ⊙ x_K``) and
the mean squared error of the un-pasted result on the known pixels (how far the model itself got).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rectflow.arrays import DataError
from rectflow.solvers import Velocity, uniform_grid

__all__ = ["FLOW_STRENGTH", "STUDENT_STRENGTH", "Inpainted", "InpaintingReport", "check_mask", "inpaint",
           "inpaint_one_step", "inpainting_report", "masked_mse", "standard_masks"]

FLOW_STRENGTH = 1.0
"""Default η for the flow's steps (benchmarks/inpainting.py: the best hidden-region MSE on digits)."""
STUDENT_STRENGTH = 1.0
"""Default η for the one-step student's corrections (benchmarks/inpainting.py)."""

Named = tuple[str, Velocity]
"""A model as ``(name, velocity)``: the name goes into the report's rows."""


@dataclass
class Inpainted:
    """``x``: completions ``(n, c, h, w)``, known pixels equal to ``y``; ``nfe``: network forwards
    per sample, counted; ``known_mse``: mean squared error of the un-pasted result against ``y`` on
    the known pixels (None when no pixel is known)."""

    x: Tensor
    nfe: int
    known_mse: float | None


class InpaintingReport(NamedTuple):
    """``rows``: one dict per (mask, model): ``model``, ``mask``, ``nfe``, ``masked_mse``, ``fd``
    (None without ``fd_fn``), ``strength``. ``grid``: example images ``(4·masks·k, c, h, w)`` in
    [−1, 1], for each mask four rows of ``nrow = k`` images: ground truth, masked input (hidden
    pixels at 0, mid-grey), teacher completion, student completion. Write it with
    ``rectflow.imaging.save_grid_png(report.grid, path, nrow=report.nrow)``."""

    rows: list[dict[str, Any]]
    grid: np.ndarray
    nrow: int


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise DataError(f"inpainting needs image data of shape (c, h, w), got shape {tuple(shape)}")
    c, h, w = (int(s) for s in shape)
    return c, h, w


def check_mask(mask: np.ndarray | Tensor, shape: tuple[int, ...], n: int | None = None,
               where: str = "mask") -> Tensor:
    """``mask`` as float32 ``(1 or n, c, h, w)`` of 0 (hidden) and 1 (observed) for images of
    ``shape = (c, h, w)``; ``n``: the number of images (one mask, or exactly ``n``).

    Accepts ``(c, h, w)``, ``(h, w)``, ``(m, c, h, w)``, ``(m, h, w)`` (a 3-D array matching
    ``(c, h, w)`` is read as one mask). Raises :class:`DataError`, one line starting with ``where``:
    another shape, ``m`` not 1 or ``n``, NaN, a value other than 0 and 1.
    """
    c, h, w = _image_shape(shape)
    m = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask)
    forms = f"(c, h, w) = ({c}, {h}, {w}), (h, w) = ({h}, {w}), (n, {c}, {h}, {w}) or (n, {h}, {w})"
    if m.dtype.kind not in "fiub":
        raise DataError(f"{where}: expected a numeric array, got dtype {m.dtype}")
    if m.shape == (c, h, w):
        m = m[None]
    elif m.shape == (h, w):
        m = m[None, None]
    elif m.ndim == 3 and m.shape[1:] == (h, w):
        m = m[:, None]
    elif not (m.ndim == 4 and m.shape[1:] == (c, h, w)):
        raise DataError(f"{where}: expected shape {forms}, got {tuple(m.shape)}")
    if len(m) == 0:
        raise DataError(f"{where}: holds no mask")
    if n is not None and len(m) not in (1, n):
        raise DataError(f"{where}: holds {len(m)} masks for {n} images; expected 1 or {n}")
    if m.dtype.kind == "f" and np.isnan(m).any():
        raise DataError(f"{where}: contains NaN; expected 1 (observed) or 0 (to fill) at every pixel")
    bad = (m != 0) & (m != 1)
    if bad.any():
        raise DataError(f"{where}: expected 1 (observed) or 0 (to fill) at every pixel, found {float(m[bad].flat[0]):g}")
    return torch.from_numpy(np.broadcast_to(m, (len(m), c, h, w)).astype(np.float32))


def standard_masks(shape: tuple[int, ...], seed: int = 0) -> dict[str, Tensor]:
    """The fixed masks of the inpainting benchmark, each ``(1, c, h, w)`` (the same for every channel):

    - ``half``: the bottom half hidden (rows ⌊h/2⌋ … h − 1);
    - ``centre``: a centre square of half the side hidden (rows and columns ⌊h/4⌋ … ⌊h/4⌋ + ⌊h/2⌋ − 1,
      likewise for w);
    - ``random``: ⌊h·w/2⌋ pixels hidden, drawn by ``torch.randperm`` from ``seed``.
    """
    c, h, w = _image_shape(shape)
    half = torch.ones(h, w)
    half[h // 2:] = 0
    centre = torch.ones(h, w)
    centre[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    random = torch.ones(h * w)
    random[torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))[: h * w // 2]] = 0
    return {name: m.reshape(1, 1, h, w).expand(1, c, h, w).contiguous()
            for name, m in (("half", half), ("centre", centre), ("random", random))}


def _boundary(y: Tensor, mask: np.ndarray | Tensor, z0: Tensor) -> Tensor:
    """The mask of ``y`` ``(n, c, h, w)`` on ``y``'s device and dtype, after checking ``z0`` and ``y``."""
    if y.ndim != 4:
        raise DataError(f"y: expected images (n, c, h, w), got shape {tuple(y.shape)}")
    if z0.shape != y.shape:
        raise DataError(f"z0: expected the shape of y {tuple(y.shape)}, got {tuple(z0.shape)}")
    if not bool(torch.isfinite(y).all()):
        raise DataError("y: contains NaN or infinite values")
    return check_mask(mask, tuple(y.shape[1:]), len(y)).to(y)


def _finish(x: Tensor, y: Tensor, m: Tensor, nfe: int) -> Inpainted:
    known = m.expand_as(x)
    count = float(known.sum())
    err = float((known * (x - y).square()).sum()) / count if count else None
    return Inpainted(torch.where(known.bool(), y, x), nfe, err)


def inpaint(v: Velocity, y: Tensor, mask: np.ndarray | Tensor, z0: Tensor, steps: int,
            strength: float = FLOW_STRENGTH) -> Inpainted:
    """Complete ``y`` ``(n, c, h, w)`` where ``mask`` is 0 by ``steps`` steered Euler steps of the
    flow ``v`` from the noise ``z0`` ``(n, c, h, w)`` (module docstring: η_i = ``strength``, the last
    one 1). The hidden pixels of ``y`` are never read. NFE = ``steps``."""
    m = _boundary(y, mask, z0)
    ts = uniform_grid(steps).tolist()
    x, b = z0, len(z0)
    with torch.inference_mode():
        for i, (t0, t1) in enumerate(pairwise(ts)):
            vt = v(x, x.new_full((b,), t0))
            eta = 1.0 if i == steps - 1 else strength
            x = x - eta * (m * (x + (1.0 - t0) * vt - y))
            x = x + (t1 - t0) * vt
    return _finish(x, y, m, steps)


def inpaint_one_step(v: Velocity, y: Tensor, mask: np.ndarray | Tensor, z0: Tensor, corrections: int = 1,
                     strength: float = STUDENT_STRENGTH) -> Inpainted:
    """Complete ``y`` ``(n, c, h, w)`` where ``mask`` is 0 with a one-step model x1 = z + v(z, 0):
    ``corrections`` steered updates of the noise ``z0`` ``(n, c, h, w)``, then the final forward
    (module docstring). NFE = ``corrections + 1``."""
    if corrections < 0:
        raise ValueError(f"corrections: must be ≥ 0, got {corrections}")
    m = _boundary(y, mask, z0)
    z, t = z0, z0.new_zeros(len(z0))
    with torch.inference_mode():
        for _ in range(corrections):
            z = z - strength * (m * (z + v(z, t) - y))
        x = z + v(z, t)
    return _finish(x, y, m, corrections + 1)


def masked_mse(x: Tensor, truth: Tensor, mask: Tensor) -> float:
    """Mean squared error over the hidden pixels (``mask`` 0) only: ``x``, ``truth`` ``(n, c, h, w)``,
    ``mask`` ``(1 or n, c, h, w)``."""
    hidden = (1 - mask).expand_as(x)
    return float((hidden * (x - truth).square()).sum() / hidden.sum())


def inpainting_report(teacher: Named, student: Named, x_test: Tensor, masks: Mapping[str, np.ndarray | Tensor],
                      steps: int = 20, fd_fn: Callable[[Tensor], float] | None = None, *, seed: int = 0,
                      strength: float = FLOW_STRENGTH, student_strength: float = STUDENT_STRENGTH,
                      corrections: int = 1, examples: int = 8) -> InpaintingReport:
    """Inpaint the held-out images ``x_test`` ``(n, c, h, w)`` under each of ``masks`` (name -> mask,
    e.g. :func:`standard_masks`) with the flow ``teacher`` at ``steps`` Euler steps and the one-step
    ``student`` with ``corrections`` corrections, all from the same noise (``torch.randn`` from ``seed``).

    Each row scores one (mask, model): ``masked_mse`` against ``x_test`` on the hidden pixels only,
    ``fd`` = ``fd_fn(completions)`` (None without ``fd_fn``). The models see only the known pixels.
    ``examples``: images per mask in the grid (:class:`InpaintingReport`).
    """
    z0 = torch.randn(x_test.shape, generator=torch.Generator().manual_seed(seed)).to(x_test)
    k = min(examples, len(x_test))
    rows: list[dict[str, Any]] = []
    panels: list[Tensor] = []
    for mask_name, mask in masks.items():
        m = check_mask(mask, tuple(x_test.shape[1:]), len(x_test), where=f"masks[{mask_name!r}]").to(x_test)
        y = m * x_test  # the hidden truth is not handed to the models
        runs = ((teacher[0], inpaint(teacher[1], y, m, z0, steps, strength), strength),
                (student[0], inpaint_one_step(student[1], y, m, z0, corrections, student_strength), student_strength))
        for name, out, eta in runs:
            rows.append({"model": name, "mask": mask_name, "nfe": out.nfe, "masked_mse": masked_mse(out.x, x_test, m),
                         "fd": fd_fn(out.x) if fd_fn is not None else None, "strength": eta})
        panels += [x_test[:k], y[:k], runs[0][1].x[:k], runs[1][1].x[:k]]
    grid = torch.cat(panels).float().cpu().numpy()
    return InpaintingReport(rows, grid, k)
