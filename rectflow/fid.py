"""FID with the user's own Inception-v3 weights on disk (``evaluate.inception``); never a download.

The Fréchet distance of :mod:`rectflow.fd` is measured in a small classifier the pipeline trains on
the target itself, which works offline for any data. Published image figures (CIFAR-10 FID and the
like) are measured in Inception-v3's pool features instead. Where a user has the standard TorchScript
detector file, ``inception-2015-12-05.pt`` (the one StyleGAN2-ADA, EDM and clean-fid use), setting
``evaluate.inception: /path/to/inception-2015-12-05.pt`` adds ``fid`` (and ``fid_net_sha256``) to every
image row of ``metrics/eval.json``, against the training split, as ``fd`` is.

The file's contract, which that detector follows: a TorchScript module called as
``net(x, return_features=True)`` with ``x`` uint8 images ``(n, 3, H, W)`` in [0, 255] (it resizes to
299 × 299 itself) returning features ``(n, F)`` (F = 2048). rectflow maps its [−1, 1] images to
uint8 the way image files are written (round, clip) and repeats a grey channel three times.
TorchScript is loaded with ``torch.jit.load`` (code for TorchScript's own interpreter, not a Python
pickle); its sha256 is recorded beside every figure, so FIDs are comparable exactly when it is equal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rectflow.config import inception_missing
from rectflow.data import DataError
from rectflow.fd import frechet_distance
from rectflow.io import file_sha256, require_file

__all__ = ["InceptionDetector", "fid_scorer", "load_inception", "to_uint8_rgb"]

KEY = "evaluate.inception"


class InceptionDetector:
    """A loaded detector file: ``features(x)`` ``(n, c, h, w)`` in [−1, 1] → ``(n, F)`` float64."""

    def __init__(self, net: torch.jit.ScriptModule, sha256: str, path: Path, device: torch.device) -> None:
        self.net, self.sha256, self.path, self.device = net, sha256, path, device

    @torch.inference_mode()
    def features(self, x: Tensor, batch_size: int = 250) -> np.ndarray:
        out = []
        for i in range(0, len(x), batch_size):
            f = self.net(to_uint8_rgb(x[i : i + batch_size]).to(self.device), return_features=True)
            if not isinstance(f, Tensor) or f.ndim != 2 or f.shape[0] != min(batch_size, len(x) - i):
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise DataError(f"{KEY}: {self.path} returned {got} for {min(batch_size, len(x) - i)} images; "
                                "expected features of shape (n, F)")
            out.append(f.float().cpu())
        return torch.cat(out).double().numpy()


def to_uint8_rgb(x: Tensor) -> Tensor:
    """``(n, c, h, w)`` in [−1, 1] → uint8 ``(n, 3, h, w)`` in [0, 255] (a grey channel repeated)."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"{KEY}: FID needs images of shape (n, 1 or 3, h, w), got {tuple(x.shape)}")
    u8 = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u8.expand(-1, 3, -1, -1).contiguous() if u8.shape[1] == 1 else u8


def load_inception(path: str | Path, device: torch.device | str = "cpu") -> InceptionDetector:
    """Load the detector file; a missing or foreign file is a :class:`DataError` naming the key."""
    p = Path(path).expanduser()
    require_file(p, DataError, inception_missing(p))
    try:
        net = torch.jit.load(str(p), map_location=device)
    except Exception as e:  # not TorchScript (a pickle, a state dict, a truncated file)
        raise DataError(f"{KEY}: {p} is not a TorchScript module ({e.__class__.__name__}); expected a "
                        "detector called as net(uint8 images, return_features=True)") from None
    net.eval()
    return InceptionDetector(net, file_sha256(p), p, torch.device(device))


def fid_scorer(path: str | Path, reference: Tensor, device: torch.device | str = "cpu") -> Callable[[Tensor], dict[str, Any]]:
    """A function ``samples (n, c, h, w) -> {"fid", "fid_net_sha256"}`` against ``reference`` images.

    The reference features are computed once, here (FID against the training split, as ``fd``).
    """
    det = load_inception(path, device)
    ref = det.features(reference)

    def score(x: Tensor) -> dict[str, Any]:
        return {"fid": frechet_distance(det.features(x), ref), "fid_net_sha256": det.sha256}

    return score
