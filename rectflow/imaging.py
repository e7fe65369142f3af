"""Image I/O: folders of PNG/JPEG files to ``(n, c, h, w)`` arrays in [−1, 1], flips, and sample grids.

Arrays follow the package layout: float32 ``(n, c, h, w)`` with ``c = 1`` (grayscale) or ``c = 3``
(RGB), values in [−1, 1]. Writing uses Pillow only (no matplotlib) and is atomic (temporary file in
the target directory, then ``os.replace``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor

from rectflow.io import atomic_write_bytes, require_file

__all__ = ["class_folders", "grid_image", "hflip_batch", "image_folder_files", "load_image_folder",
           "load_labelled_image_folder", "save_grid_png", "side_by_side_png", "to_unit_range"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHANNELS = {"1": 1, "L": 1, "RGB": 3}
"""Pillow modes accepted as they are (``"1"`` is bilevel, read as 0/255); palette images become RGB."""


def to_unit_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Affine map of ``[lo, hi]`` onto ``[−1, 1]`` as float32 (values outside are mapped, not clipped)."""
    if not hi > lo:
        raise ValueError(f"to_unit_range: need hi > lo, got lo={lo}, hi={hi}")
    return ((np.asarray(arr, dtype=np.float64) - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)


def _images_in(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name (hidden files skipped)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    for p in files:  # an image name on a FIFO or a device is refused, not waited on nor skipped
        require_file(p, ValueError, f"{p}: missing")
    return files


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise NotADirectoryError(f"load_image_folder: {folder} is not a directory")
    files = _images_in(folder)
    if not files:
        raise ValueError(f"load_image_folder: no {'/'.join(IMAGE_SUFFIXES)} files in {folder}")
    return files


def class_folders(folder: Path) -> dict[str, list[Path]]:
    """The class sub-folders of an image folder and their images: ``{name: sorted image files}`` for
    each non-hidden sub-folder, in order of name, when the folder holds no image file directly (a
    folder with images of its own is one unlabelled set, as ever), else {}. Every class sub-folder
    must hold images (ValueError naming the first that holds none)."""
    if not folder.is_dir() or _images_in(folder):
        return {}
    classes = {p.name: _images_in(p) for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
    empty = next((name for name, files in classes.items() if not files), None)
    if empty is not None:
        raise ValueError(f"{folder / empty}: no {'/'.join(IMAGE_SUFFIXES)} files; expected images in every class "
                         f"sub-folder of {folder} (one sub-folder per class)")
    return classes


def image_folder_files(folder: Path) -> list[Path]:
    """Every image of an image folder: its own images (sorted), or those of each class sub-folder
    (:func:`class_folders`, in order, each sorted)."""
    classes = class_folders(folder)
    return [f for files in classes.values() for f in files] if classes else _image_files(folder)


def _read_image(path: Path) -> np.ndarray:
    """One file as uint8 ``(c, h, w)`` with c = 1 (``L``/``1``) or 3 (``RGB``/palette without alpha)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P" and "transparency" not in im.info:
                im = im.convert("RGB")
            if im.mode not in _CHANNELS:
                raise ValueError(
                    f"{path}: unsupported image mode {im.mode!r}; expected grayscale (L) or RGB without alpha"
                )
            if im.mode == "1":
                im = im.convert("L")
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: cannot be read as an image ({e})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_image_folder(path: str | os.PathLike[str]) -> np.ndarray:
    """All ``*.png``/``*.jpg``/``*.jpeg`` files directly in ``path`` (sorted by name) as float32 ``(n, c, h, w)``.

    Suffixes match case-insensitively; hidden files (``.name``, e.g. macOS ``._x.png``) and
    subfolders are skipped.

    Grayscale images give ``c = 1``, RGB ``c = 3``; 8-bit values map linearly onto [−1, 1]. Every
    image must have the first one's size and channel count: the first file that differs raises
    ``ValueError`` naming it, its size/mode and the expected ones.
    """
    return _read_images(_image_files(Path(path)))


def load_labelled_image_folder(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """An image folder with its labels: ``(x, y, names)``.

    A folder with images of its own is :func:`load_image_folder` (``y``, ``names`` None). A folder of
    class sub-folders (:func:`class_folders`) gives every sub-folder's images, in order, as float32
    ``(n, c, h, w)``, ``y`` int64 ``(n,)`` the index of each image's sub-folder among the sorted
    sub-folder names (0 … K−1), and ``names`` those K names. Every image must have the first one's
    size and channel count, whichever sub-folder it is in. ValueError naming the file otherwise.
    """
    folder = Path(path)
    classes = class_folders(folder)
    if not classes:
        return load_image_folder(folder), None, None
    y = np.repeat(np.arange(len(classes), dtype=np.int64), [len(files) for files in classes.values()])
    return _read_images([f for files in classes.values() for f in files]), y, list(classes)


def _read_images(files: list[Path]) -> np.ndarray:
    """``files`` (at least one) as float32 ``(n, c, h, w)`` in [−1, 1], each the first one's size and mode."""
    first = _read_image(files[0])
    out = np.empty((len(files), *first.shape), dtype=np.float32)
    out[0] = to_unit_range(first, 0, 255)
    for i, f in enumerate(files[1:], start=1):
        arr = _read_image(f)
        if arr.shape != first.shape:
            raise ValueError(
                f"{f}: {_describe(arr.shape)} differs from {_describe(first.shape)} of {files[0].name}; "
                "all images in the folder must share one size and mode"
            )
        out[i] = to_unit_range(arr, 0, 255)
    return out


def _describe(chw: Sequence[int]) -> str:
    c, h, w = chw
    return f"size {w}x{h} (w x h) with {'1 channel (grayscale)' if c == 1 else f'{c} channels (RGB)'}"


def hflip_batch(x: Tensor, generator: torch.Generator) -> Tensor:
    """Flip each image of ``x: (B, c, h, w)`` left-right with probability ½; returns a new ``(B, c, h, w)``.

    The coin flips are ``torch.rand(B, generator=generator) < 0.5`` drawn on the generator's device.
    """
    if x.ndim != 4:
        raise ValueError(f"hflip_batch: x must be (B, c, h, w), got shape {tuple(x.shape)}")
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)


def grid_image(samples: np.ndarray, nrow: int = 8, padding: int = 2, scale: int = 1) -> Image.Image:
    """Tile ``samples: (n, c, h, w)`` in [−1, 1] into one Pillow image, ``nrow`` images per row.

    Values are clipped to [−1, 1] (NaN shows as mid-grey); each image is enlarged ``scale`` times with
    nearest-neighbour sampling; padding is mid-grey, so black-background images stay apart. The
    result is mode ``L`` for c = 1 and ``RGB`` for c = 3, of width ``cols·w·scale + (cols + 1)·padding``
    and height ``rows·h·scale + (rows + 1)·padding`` with ``cols = min(nrow, n)``, ``rows = ⌈n / nrow⌉``.
    """
    arr = np.asarray(samples)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or len(arr) == 0:
        raise ValueError(f"grid_image: samples must be (n, c, h, w) with n ≥ 1 and c in (1, 3), got {arr.shape}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"grid_image: need nrow ≥ 1, padding ≥ 0, scale ≥ 1, got {nrow}, {padding}, {scale}")
    n, c, h, w = arr.shape
    pix = np.clip(np.nan_to_num(arr.astype(np.float64), nan=0.0), -1.0, 1.0)
    pix = np.round((pix + 1.0) * 127.5).astype(np.uint8).repeat(scale, axis=2).repeat(scale, axis=3)
    hs, ws = h * scale, w * scale
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    canvas = np.full((rows * hs + (rows + 1) * padding, cols * ws + (cols + 1) * padding, c), 128, dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // cols) * (hs + padding), padding + (i % cols) * (ws + padding)
        canvas[top : top + hs, left : left + ws] = pix[i].transpose(1, 2, 0)
    return Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)  # uint8 (H, W) -> L, (H, W, 3) -> RGB


def _save_png(image: Image.Image, path: str | os.PathLike[str]) -> None:
    """Encode ``image`` as PNG and write it to ``path`` atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def save_grid_png(
    samples: np.ndarray, path: str | os.PathLike[str], nrow: int = 8, padding: int = 2, scale: int = 1
) -> None:
    """Write :func:`grid_image` of ``samples: (n, c, h, w)`` in [−1, 1] to ``path`` as PNG, atomically."""
    _save_png(grid_image(samples, nrow, padding, scale), path)


def side_by_side_png(
    panels: Sequence[tuple[str, np.ndarray]],
    path: str | os.PathLike[str],
    nrow: int = 8,
    padding: int = 2,
    scale: int = 1,
    gap: int = 12,
) -> None:
    """Write titled grids next to each other (e.g. ``"1-RF, 1 step" | "2-RF, 1 step" | "distilled"``) as one PNG.

    Each panel is ``(title, samples: (n, c, h, w) in [−1, 1])`` rendered with :func:`grid_image`;
    titles use Pillow's default font on a white strip above the grids; panels are ``gap`` pixels
    apart. The output is RGB (grayscale panels are converted), written atomically.
    """
    if not panels:
        raise ValueError("side_by_side_png: need at least one panel")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    grids = [grid_image(samples, nrow, padding, scale).convert("RGB") for _, samples in panels]
    boxes = [measure.textbbox((0, 0), title, font=font) for title, _ in panels]
    title_h = max(b[3] for b in boxes) + 2 * gap // 3
    widths = [max(g.width, b[2] - b[0]) for g, b in zip(grids, boxes, strict=True)]
    size = (sum(widths) + gap * (len(panels) + 1), title_h + max(g.height for g in grids) + gap)
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    left = gap
    for (title, _), grid, box, width in zip(panels, grids, boxes, widths, strict=True):
        draw.text((left + (width - (box[2] - box[0])) // 2 - box[0], gap // 3), title, fill="black", font=font)
        canvas.paste(grid, (left + (width - grid.width) // 2, title_h))
        left += width + gap
    _save_png(canvas, path)
