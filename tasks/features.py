"""The frozen feature network behind the Fréchet distance (image data only).

``prepare`` trains it once on the target's training split (digits: on their labels; user images:
on k-means cluster ids) and writes ``data/prepared/features.safetensors`` + ``.json``; it changes
only when the target data does. Every FD figure carries the sha256 of those weights, so numbers are
comparable exactly when the hashes are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rectflow.config import Params
from rectflow.data import load_prepared
from rectflow.fd import extract_features, frechet_distance, load_feature_net, precision_recall, save_feature_net, train_feature_net
from rectflow.io import file_sha256
from rectflow.layout import Layout

FEATURES = "features"


def train_and_save(layout: Layout, x_train: np.ndarray, labels: np.ndarray | None, seed: int) -> dict[str, Any]:
    net = train_feature_net(x_train, labels, seed)
    weights, _ = save_feature_net(net, layout.prepared / FEATURES)
    return {"path": str(weights.relative_to(layout.root)), "sha256": file_sha256(weights),
            "trained_on": "labels" if labels is not None else "k-means clusters"}


def fd_scorer(p: Params, layout: Layout, dev: torch.device) -> Callable[[torch.Tensor], dict[str, Any]] | None:
    """A function ``samples (n, c, h, w) -> {"fd", "fd_net_sha256", "precision", "recall"}``."""
    stem = layout.prepared / FEATURES
    if not stem.with_suffix(".safetensors").is_file():
        return None
    net = load_feature_net(stem)
    sha = file_sha256(stem.with_suffix(".safetensors"))
    ref = load_prepared(layout.prepared, "target", "train").data
    assert ref is not None
    ref_feats = extract_features(net, ref.numpy())

    def score(x: torch.Tensor) -> dict[str, Any]:
        feats = extract_features(net, x.detach().float().cpu().numpy())
        pr = precision_recall(feats, ref_feats)
        return {"fd": frechet_distance(feats, ref_feats), "fd_net_sha256": sha,
                "precision": pr.precision, "recall": pr.recall}

    return score
