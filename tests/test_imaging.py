"""Image folders, flips and PNG grids, against files written with Pillow by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rectflow.imaging import (
    grid_image,
    hflip_batch,
    load_image_folder,
    save_grid_png,
    side_by_side_png,
    to_unit_range,
)


def _write(path: Path, arr: np.ndarray) -> None:
    """``arr``: uint8 (h, w) or (h, w, 3)."""
    Image.fromarray(arr).save(path)


def test_to_unit_range() -> None:
    np.testing.assert_allclose(to_unit_range(np.array([0, 8, 16]), 0, 16), [-1.0, 0.0, 1.0])
    assert to_unit_range(np.array([255], dtype=np.uint8), 0, 255).dtype == np.float32
    with pytest.raises(ValueError, match="hi > lo"):
        to_unit_range(np.zeros(3), 1, 1)


def test_grayscale_folder_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 6, 10), dtype=np.uint8)
    for i, img in enumerate(images):
        _write(tmp_path / f"img{i}.png", img)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "._img0.png").write_bytes(b"macOS resource fork, ignored")
    x = load_image_folder(tmp_path)
    assert x.shape == (3, 1, 6, 10) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 0], images / 127.5 - 1.0, atol=1e-6)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_rgb_folder_round_trip_and_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        _write(tmp_path / f"{i:02d}.PNG", img)
    x = load_image_folder(tmp_path)
    assert x.shape == (4, 3, 8, 8)
    np.testing.assert_allclose(x, images.transpose(0, 3, 1, 2) / 127.5 - 1.0, atol=1e-6)
    # Grid without padding: the images come back exactly, tiled row by row.
    grid = np.asarray(grid_image(x, nrow=2, padding=0))
    assert grid.shape == (16, 16, 3)
    np.testing.assert_array_equal(grid[8:, :8], images[2])
    np.testing.assert_array_equal(grid[:8, 8:], images[1])


def test_jpeg_is_read(tmp_path: Path) -> None:
    Image.fromarray(np.full((4, 4, 3), 200, dtype=np.uint8)).save(tmp_path / "a.jpg", quality=95)
    x = load_image_folder(tmp_path)
    assert x.shape == (1, 3, 4, 4)
    np.testing.assert_allclose(x, 200 / 127.5 - 1.0, atol=0.03)


def test_mixed_sizes_rejected_naming_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    _write(tmp_path / "b.png", np.zeros((8, 8), dtype=np.uint8))
    _write(tmp_path / "c.png", np.zeros((8, 6), dtype=np.uint8))
    _write(tmp_path / "d.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"c\.png: size 6x8 .* differs from size 8x8 .* of a\.png"):
        load_image_folder(tmp_path)


def test_mixed_modes_rejected_naming_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    _write(tmp_path / "b.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"b\.png: .*3 channels \(RGB\) differs from .*1 channel"):
        load_image_folder(tmp_path)


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no .png"):
        load_image_folder(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: cannot be read"):
        load_image_folder(tmp_path)
    (tmp_path / "broken.png").unlink()
    Image.new("RGBA", (4, 4)).save(tmp_path / "alpha.png")
    with pytest.raises(ValueError, match=r"alpha\.png: unsupported image mode 'RGBA'"):
        load_image_folder(tmp_path)


def test_hflip_batch() -> None:
    x = torch.arange(64 * 2 * 3 * 4, dtype=torch.float32).reshape(64, 2, 3, 4)
    out = hflip_batch(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x, strict=True)])
    assert bool((flipped ^ kept).all())  # each image is either flipped or untouched
    assert 16 < int(flipped.sum()) < 48
    again = hflip_batch(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)  # reproducible from the generator
    assert torch.equal(x[0, 0, 0], torch.arange(4, dtype=torch.float32))  # input untouched


def test_save_grid_png_size_and_values(tmp_path: Path) -> None:
    samples = np.linspace(-1, 1, 10 * 1 * 5 * 7, dtype=np.float32).reshape(10, 1, 5, 7)
    samples[0] = 5.0  # out of range: clipped to white
    path = tmp_path / "out" / "grid.png"
    save_grid_png(samples, path, nrow=4, padding=2, scale=3)
    with Image.open(path) as im:
        assert im.mode == "L"
        # 4 columns, 3 rows of 21x15 images with 2-px padding.
        assert im.size == (4 * 21 + 5 * 2, 3 * 15 + 4 * 2)
        arr = np.asarray(im)
    assert (arr[2:17, 2:23] == 255).all()
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary left behind


def test_side_by_side_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.uniform(-1, 1, (16, 1, 8, 8)).astype(np.float32)
    rgb = rng.uniform(-1, 1, (16, 3, 8, 8)).astype(np.float32)
    path = tmp_path / "panels.png"
    side_by_side_png([("1-RF, 1 step", gray), ("2-RF, 1 step", gray), ("distilled", rgb)], path, nrow=4, scale=2)
    grid_w, grid_h = grid_image(gray, nrow=4, scale=2).size
    with Image.open(path) as im:
        assert im.mode == "RGB"
        assert im.width >= 3 * grid_w and im.height > grid_h
        arr = np.asarray(im)
    title_strip = arr[: arr.shape[0] - grid_h - 12]
    assert (title_strip < 128).any()  # the titles are drawn in black on white
    with pytest.raises(ValueError, match="at least one panel"):
        side_by_side_png([], path)
