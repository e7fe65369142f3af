"""The frozen feature network behind the Fréchet distance (image data only).

``prepare`` trains it once on the target's training split (digits and a conditional run's images: on
their labels, so that its predictions measure label accuracy; other user images: on k-means cluster
ids) and writes ``data/prepared/features.safetensors`` + ``.json``; it changes
only when the target data does. Every FD figure carries the sha256 of those weights, so numbers are
comparable exactly when the hashes are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from rectflow.config import Params
from rectflow.data import DataError, load_prepared
from rectflow.fd import FeatureNet, extract_features, frechet_distance, frechet_distance_se, load_feature_net, precision_recall, save_feature_net, train_feature_net
from rectflow.io import file_sha256
from rectflow.layout import Layout

FEATURES = "features"


def train(x_train: np.ndarray, labels: np.ndarray | None, seed: int, where: str) -> FeatureNet:
    """The feature network of ``x_train`` (``where`` names the data in errors), trained in memory and
    checked (finite weights) before anything is written: DataError if the data cannot train it."""
    import warnings

    flat = np.asarray(x_train).reshape(len(x_train), -1)
    if labels is None and (len(flat) < 2 or not (flat != flat[0]).any()):
        raise DataError(f"{where}: image data needs at least 2 distinct training images (the feature network of "
                        f"the Fréchet distance learns to tell them apart), got {len(flat)} training image(s)"
                        f"{', all identical' if len(flat) > 1 else ''}")
    with warnings.catch_warnings():  # k-means on few distinct images warns; the clusters it finds are used
        warnings.simplefilter("ignore")
        try:
            net = train_feature_net(x_train, labels, seed)
        except ValueError as e:  # e.g. extreme values that k-means cannot tell apart
            raise DataError(f"{where}: cannot train the feature network of the Fréchet distance on it "
                            f"({' '.join(str(e).split())[:200]})") from None
    bad = next((k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise DataError(f"{where}: its values are too extreme to train the feature network of the Fréchet distance "
                        f"(weight {bad} became NaN or infinite); rescale the data")
    return net


def save(layout: Layout, net: FeatureNet, labels: np.ndarray | None, conditional: bool = False) -> dict[str, Any]:
    """Write the feature net; its record in ``meta.json``: path, sha256, ``trained_on`` ("labels" or
    "k-means clusters") and, for a conditional run, ``output_labels``: the label of each of the
    classifier's outputs (``labels`` ``(n_train,)`` it was trained on, distinct, ascending), so that
    ``output_labels[argmax(logits)]`` is its predicted label."""
    weights, _ = save_feature_net(net, layout.prepared / FEATURES)
    record = {"path": str(weights.relative_to(layout.root)), "sha256": file_sha256(weights),
              "trained_on": "labels" if labels is not None else "k-means clusters"}
    if conditional and labels is not None:
        record["output_labels"] = np.unique(labels).tolist()
    return record


def fd_scorer(p: Params, layout: Layout, dev: torch.device) -> Callable[..., dict[str, Any]] | None:
    """A function ``score(samples (n, c, h, w), se=True) -> {"fd", "fd_se", "fd_net_sha256",
    "precision", "recall"}`` (``fd_se``: the FD's bootstrap standard error over the samples,
    :func:`rectflow.fd.frechet_distance_se`, 30 more FDs: ``se=False`` leaves it out for callers
    that only rank, such as inpainting's and the registry's). None without a feature net."""
    stem = layout.prepared / FEATURES
    if not stem.with_suffix(".safetensors").is_file():
        return None
    net = load_feature_net(stem)
    sha = file_sha256(stem.with_suffix(".safetensors"))
    ref = load_prepared(layout.prepared, "target", "train").data
    assert ref is not None
    ref_feats = extract_features(net, ref.numpy())

    def score(x: torch.Tensor, se: bool = True) -> dict[str, Any]:
        feats = extract_features(net, x.detach().float().cpu().numpy())
        pr = precision_recall(feats, ref_feats)
        out = {"fd": frechet_distance(feats, ref_feats), "fd_net_sha256": sha,
               "precision": pr.precision, "recall": pr.recall}
        if se:
            out["fd_se"] = frechet_distance_se(feats, ref_feats)
        return out

    return score
