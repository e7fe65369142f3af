"""FID with a user's TorchScript Inception detector on disk (rectflow/fid.py).

The real detector (inception-2015-12-05.pt) cannot be downloaded here, so these tests script a small
detector with the same calling contract (uint8 (n, 3, H, W) in, ``return_features=True`` → (n, F))
and check the loading code, the image conversion and the Fréchet distance on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from rectflow.data import DataError
from rectflow.fd import frechet_distance
from rectflow.fid import fid_scorer, load_inception, to_uint8_rgb
from rectflow.io import file_sha256


class TinyDetector(nn.Module):
    """Inception's contract in miniature: uint8 RGB in, resized inside, pool features or logits out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        if x.dtype != torch.uint8:
            raise ValueError("expected uint8 images")
        y = nn.functional.interpolate(x.float() / 127.5 - 1, size=(12, 12), mode="bilinear", align_corners=False)
        feats = torch.tanh(self.conv(y)).mean(dim=(2, 3))
        return feats if return_features else self.head(feats)


def scripted(tmp_path: Path) -> Path:
    path = tmp_path / "inception-tiny.pt"
    torch.jit.script(TinyDetector()).save(str(path))
    return path


def images(n: int, seed: int, c: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(-1, 1, 8).repeat(8, 1)  # a gradient image with per-sample jitter
    return (base + 0.3 * torch.randn(n, c, 8, 8, generator=g)).clamp(-1, 1)


def test_uint8_conversion_matches_image_files():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).reshape(1, 1, 1, 6)
    u = to_uint8_rgb(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 1, 6)
    assert u[0, 0, 0].tolist() == [0, 64, 128, 191, 255, 255]  # round(127.5·(x + 1)), clipped
    assert torch.equal(u[:, 0], u[:, 1]) and torch.equal(u[:, 1], u[:, 2])  # grey repeated
    rgb = images(2, 0, c=3)
    assert torch.equal(to_uint8_rgb(rgb)[:, 2], to_uint8_rgb(rgb[:, 2:3])[:, 0])
    with pytest.raises(DataError, match="evaluate.inception.*shape"):
        to_uint8_rgb(torch.zeros(2, 2, 8, 8))


def test_fid_self_zero_and_grows_with_noise(tmp_path):
    path = scripted(tmp_path)
    ref = images(400, 0)
    score = fid_scorer(path, ref)
    same = score(ref)
    assert same["fid_net_sha256"] == file_sha256(path) and len(same["fid_net_sha256"]) == 64
    assert abs(same["fid"]) < 1e-6
    g = torch.Generator().manual_seed(1)
    noisy = [score((ref + s * torch.randn(ref.shape, generator=g)).clamp(-1, 1))["fid"] for s in (0.05, 0.2, 0.6)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]
    # the figure is the Fréchet distance of the detector's own features, nothing else
    det = load_inception(path)
    x = images(300, 5)
    with torch.no_grad():
        want = frechet_distance(det.net(to_uint8_rgb(x), return_features=True).double().numpy(),
                                det.net(to_uint8_rgb(ref), return_features=True).double().numpy())
    assert score(x)["fid"] == pytest.approx(want, rel=1e-9)
    assert det.features(x, batch_size=7).shape == (300, 16)
    np.testing.assert_allclose(det.features(x, batch_size=7), det.features(x), rtol=1e-5, atol=1e-7)


def test_bad_detector_files(tmp_path):
    with pytest.raises(DataError, match=r"evaluate.inception: .*missing.pt does not exist"):
        load_inception(tmp_path / "missing.pt")
    junk = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, junk)  # a plain state dict, not TorchScript
    with pytest.raises(DataError, match="evaluate.inception: .*weights.pt is not a TorchScript module"):
        load_inception(junk)

    class Logits(nn.Module):
        def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
            return x.float().mean(dim=(2, 3)).t()  # (3, n): not one row of features per image

    wrong = tmp_path / "wrong.pt"
    torch.jit.script(Logits()).save(str(wrong))
    with pytest.raises(DataError, match=r"wrong.pt returned \(3, 2\) for 2 images"):
        load_inception(wrong).features(images(2, 0))
