"""What evaluate measures of a conditional run (classifier-free guidance, docs/conditional.md).

- **Label accuracy**: the share of samples generated for label y that a fixed classifier assigns to
  y, overall and per class. Images: the frozen feature network that the Fréchet distance already
  uses (``data/prepared/features.safetensors``, trained by prepare on the target's training labels;
  its sha256 goes with every figure). Vectors: a k-nearest-neighbour vote (k = :data:`KNN`) among
  the target's labelled training rows, which for 8gaussians is "the nearest mode".
- **Per-class quality**: W2 (vectors) or FD (images, in the same feature space) between the samples
  of class y and the held-out (vectors) or training (images, as the overall FD) rows of class y.
- **Class grids**: one row of samples per class (``plots/classes/NAME.png``).

The samples of every row use the same labels: ``y_k = k mod K`` for the k-th noise draw, so each
class gets ⌊n/K⌋ or ⌈n/K⌉ samples and two models are compared on the same (noise, label) pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rectflow import metrics
from rectflow.data import load_prepared
from rectflow.io import file_sha256
from rectflow.layout import Layout

KNN = 5


def eval_labels(n: int, classes: int) -> torch.Tensor:
    """``(n,)`` int64: ``k mod classes`` (balanced, fixed: the same for every model)."""
    return torch.arange(n) % classes


@dataclass
class Judge:
    """The fixed classifier of label accuracy: ``predict(x (n, *shape)) -> (n,)`` labels, named by
    ``kind`` and the sha256 of what it was built from; ``quality(x, k)`` the per-class W2 or FD of
    samples ``x`` of class ``k``."""

    kind: str
    sha256: str
    predict: Callable[[torch.Tensor], np.ndarray]
    quality: Callable[[torch.Tensor, int], float]
    quality_key: str  # "w2" or "fd"


def judge(layout: Layout, classes: int, dev: torch.device) -> Judge:
    """The classifier (and per-class quality) of this workspace's conditional run."""
    train = load_prepared(layout.prepared, "target", "train")
    assert train.data is not None and train.labels is not None
    stem = layout.prepared / "features"
    if len(train.shape) == 3 and stem.with_suffix(".safetensors").is_file():
        from rectflow.fd import extract_features, frechet_distance, load_feature_net

        from rectflow.data import prepared_meta

        net = load_feature_net(stem).to(dev).eval()
        ref_y = train.labels.numpy()
        # the label of each of the network's outputs (prepare records it; the identity for digits)
        out_labels = torch.as_tensor((prepared_meta(layout.prepared).get("features") or {}).get(
            "output_labels") or list(range(net.n_classes)))
        ref_feats = extract_features(net.cpu(), train.data.numpy())
        net = net.to(dev)

        @torch.inference_mode()
        def predict(x: torch.Tensor) -> np.ndarray:
            out = [net(x[i : i + 1024].to(dev).float()).argmax(1).cpu() for i in range(0, len(x), 1024)]
            return out_labels[torch.cat(out)].numpy()

        def fd_of(x: torch.Tensor, k: int) -> float:
            feats = extract_features(net.cpu(), x.detach().float().cpu().numpy())
            net.to(dev)
            return frechet_distance(feats, ref_feats[ref_y == k])

        return Judge("feature-net", file_sha256(stem.with_suffix(".safetensors")), predict, fd_of, "fd")
    from sklearn.neighbors import KNeighborsClassifier

    flat = train.data.reshape(len(train.data), -1).numpy()
    knn = KNeighborsClassifier(n_neighbors=KNN).fit(flat, train.labels.numpy())
    test = load_prepared(layout.prepared, "target", "test")
    assert test.data is not None and test.labels is not None
    sha = file_sha256(layout.prepared / "target-train.npy")

    def predict_knn(x: torch.Tensor) -> np.ndarray:
        return knn.predict(x.detach().float().cpu().reshape(len(x), -1).numpy())

    def w2_of(x: torch.Tensor, k: int) -> float:
        return metrics.w2(x, test.data[test.labels == k])  # type: ignore[index]

    return Judge(f"knn-{KNN}", sha, predict_knn, w2_of, "w2")


def class_report(x: torch.Tensor, y: torch.Tensor, classes: int, j: Judge) -> dict[str, Any]:
    """``accuracy`` (overall), ``accuracy_net_sha256`` and ``per_class`` (``accuracy`` and the
    judge's ``w2``/``fd`` lists, class 0 … K − 1) of samples ``x`` generated for labels ``y``."""
    pred = j.predict(x)
    yy = y.cpu().numpy()
    hit = pred == yy
    per_acc, per_q = [], []
    for k in range(classes):
        mine = yy == k
        per_acc.append(float(hit[mine].mean()) if mine.any() else None)
        per_q.append(j.quality(x[torch.from_numpy(mine).to(x.device)], k) if mine.sum() >= 2 else None)
    return {"accuracy": float(hit.mean()), "accuracy_by": j.kind, "accuracy_net_sha256": j.sha256,
            "per_class": {"accuracy": per_acc, j.quality_key: per_q}}


def class_grid(x: torch.Tensor, y: torch.Tensor, classes: int, path: Path, per_row: int = 8) -> None:
    """``plots/classes/NAME.png``: one row of ``per_row`` samples per class (images only)."""
    from rectflow.imaging import save_grid_png

    rows = []
    for k in range(classes):
        mine = x[y.to(x.device) == k][:per_row].cpu()
        if len(mine) < per_row:  # fewer samples than a row: pad with blanks (−1: black)
            mine = torch.cat([mine, -torch.ones((per_row - len(mine), *x.shape[1:]))])
        rows.append(mine)
    save_grid_png(torch.cat(rows).numpy(), path, nrow=per_row, scale=3)


class EvalLabels(torch.nn.Module):
    """A conditional model seen as an unconditional one by evaluate: a batch of B rows is generated
    for the labels :func:`eval_labels` (B, K) at guidance scale ``w`` (:class:`rectflow.guidance.Guided`),
    so every prefix of the evaluation noise gets the same labels (the 64 samples of a figure are the
    first 64 of a row's). ``forwards`` (1 or 2) makes the solvers count NFE in network forwards."""

    def __init__(self, inner: torch.nn.Module, classes: int, w: float) -> None:
        super().__init__()
        from rectflow.guidance import Guided

        self.inner, self.classes, self.w = inner, int(classes), float(w)
        self.average_velocity = bool(getattr(inner, "average_velocity", False))
        self.forwards = Guided(inner, torch.zeros(1, dtype=torch.long), self.w).forwards

    def guided(self, y: torch.Tensor):  # type: ignore[no-untyped-def]
        """The guided velocity of the inner model for explicit labels ``y`` ``(B,)`` (real rows')."""
        from rectflow.guidance import Guided

        return Guided(self.inner, y, self.w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, end: torch.Tensor | None = None) -> torch.Tensor:
        y = eval_labels(x.shape[0], self.classes).to(x.device)
        return self.guided(y)(x, t, end)


def bind_eval_labels(model: torch.nn.Module, card: dict[str, Any], w: float) -> torch.nn.Module:
    """``model`` itself when unconditional, else :class:`EvalLabels` of it at scale ``w``."""
    classes = int(card["arch"].get("classes", 0))
    return EvalLabels(model, classes, w) if classes else model
