"""Fréchet distance (FD) in the feature space of a small, frozen classifier trained on the target set.

The pipeline trains one :class:`FeatureNet` on the target's *training* split (never on held-out data),
saves it with :func:`save_feature_net` and scores every model against the held-out split with
:func:`fd`. With labels (digits) the net is a plain classifier; without labels (user arrays) it
classifies k-means cluster ids of the training data (k = 10, fixed seed), which needs no labels and
still yields features tuned to the data's modes. Training is deterministic for a given seed on CPU.

FD (Heusel et al., 2017) between Gaussians fitted to two feature sets::

    FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^{1/2})

Numbers are comparable only between runs that use the *same* feature net (compare its sha256, see
:func:`file_sha256`) and the same sample counts; FD is biased upwards for small ``n``.

Inception-based FID is deliberately not provided: it needs weights this package may not download.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import load_file, save
from sklearn.cluster import KMeans
from torch import Tensor, nn

from rectflow.io import atomic_write_bytes, file_sha256, require_file

__all__ = [
    "FeatureNet",
    "PrecisionRecall",
    "cluster_labels",
    "extract_features",
    "fd",
    "file_sha256",
    "frechet_distance",
    "frechet_distance_se",
    "load_feature_net",
    "precision_recall",
    "save_feature_net",
    "train_feature_net",
]

FEATURE_DIM = 64
KMEANS_CLUSTERS = 10


class FeatureNet(nn.Module):
    """Small classifier whose penultimate activations are the FD feature space.

    Image inputs ``(c, h, w)`` use a CNN (3×3 convs, stride-2 stages down to ≤ 4 px, global average
    pool); flat inputs ``(d,)`` use an MLP. Inputs are standardised with the stored training
    statistics (buffers ``in_mean``/``in_std``), so raw data of any scale can be fed.

    Args:
        shape: per-sample shape, ``(c, h, w)`` or ``(d,)``.
        n_classes: number of output logits.
        width: base width (CNN channels / MLP hidden units).
        feature_dim: ``F``, width of :meth:`features`.
    """

    def __init__(
        self, shape: tuple[int, ...], n_classes: int, width: int = 32, feature_dim: int = FEATURE_DIM
    ) -> None:
        super().__init__()
        if len(shape) not in (1, 3) or any(int(s) <= 0 for s in shape):
            raise ValueError(f"FeatureNet: shape must be (c, h, w) or (d,) with positive entries, got {tuple(shape)}")
        if n_classes < 2:
            raise ValueError(f"FeatureNet: need at least 2 classes, got {n_classes}")
        self.shape = tuple(int(s) for s in shape)
        self.n_classes = n_classes
        self.width = width
        self.feature_dim = feature_dim
        stat_shape = (self.shape[0], 1, 1) if len(self.shape) == 3 else self.shape
        self.register_buffer("in_mean", torch.zeros(stat_shape))
        self.register_buffer("in_std", torch.ones(stat_shape))
        if len(self.shape) == 3:
            self.body = _cnn_body(self.shape, width, feature_dim)
        else:
            self.body = _mlp_body(self.shape[0], width, feature_dim)
        self.head = nn.Linear(feature_dim, n_classes)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable); ``FeatureNet(**net.config())`` rebuilds the architecture."""
        return {
            "shape": list(self.shape),
            "n_classes": self.n_classes,
            "width": self.width,
            "feature_dim": self.feature_dim,
        }

    def set_input_stats(self, x: Tensor) -> None:
        """Store per-channel (images) or per-coordinate (vectors) mean and std of ``x: (N, *shape)``."""
        dims = (0, 2, 3) if x.ndim == 4 else (0,)
        self.in_mean.copy_(x.mean(dim=dims).reshape(self.in_mean.shape))
        self.in_std.copy_(x.std(dim=dims).clamp_min(1e-6).reshape(self.in_std.shape))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: ``(B, *shape) -> (B, F)``."""
        if tuple(x.shape[1:]) != self.shape:
            expected = ", ".join(map(str, self.shape))
            raise ValueError(f"FeatureNet: expected inputs of shape (B, {expected}), got {tuple(x.shape)}")
        return self.body((x - self.in_mean) / self.in_std)

    def forward(self, x: Tensor) -> Tensor:
        """Logits: ``(B, *shape) -> (B, n_classes)``."""
        return self.head(self.features(x))


def _cnn_body(shape: tuple[int, ...], width: int, feature_dim: int) -> nn.Sequential:
    """Conv stack ``(B, c, h, w) -> (B, feature_dim)``: stride-2 stages until the smaller side is ≤ 4."""
    c, h, w = shape
    layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.SiLU()]
    ch, side = width, min(h, w)
    while side > 4:
        layers += [nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1), nn.SiLU()]
        ch, side = 2 * ch, math.ceil(side / 2)
    layers += [nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers += [nn.Linear(ch, feature_dim), nn.SiLU()]
    return nn.Sequential(*layers)


def _mlp_body(dim: int, width: int, feature_dim: int) -> nn.Sequential:
    """MLP ``(B, d) -> (B, feature_dim)``."""
    hidden = 4 * width
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, feature_dim),
        nn.SiLU(),
    )


def cluster_labels(x_train: np.ndarray, seed: int, k: int = KMEANS_CLUSTERS, max_fit: int = 10_000) -> np.ndarray:
    """k-means cluster ids ``(N,)`` of the flattened ``x_train: (N, ...)``.

    k is capped at N; the centroids are fitted on a seeded subsample of at most ``max_fit`` rows,
    then every row is assigned to its nearest centroid.
    """
    flat = np.asarray(x_train, dtype=np.float32).reshape(len(x_train), -1)
    rng = np.random.default_rng(seed)
    fit = flat if len(flat) <= max_fit else flat[rng.choice(len(flat), max_fit, replace=False)]
    km = KMeans(n_clusters=min(k, len(fit)), random_state=seed, n_init=3).fit(fit)
    return km.predict(flat)


def train_feature_net(
    x_train: np.ndarray,
    labels: np.ndarray | None,
    seed: int,
    steps: int = 400,
    batch_size: int = 256,
    lr: float = 2e-3,
) -> FeatureNet:
    """Train a :class:`FeatureNet` on ``x_train: (N, c, h, w) or (N, d)`` and return it frozen (eval mode).

    ``labels: (N,)`` of any hashable dtype are used as classes when given; otherwise the classes are
    :func:`cluster_labels` of ``x_train``. Adam, cross-entropy, minibatches drawn with a private
    generator seeded by ``seed``; the global torch RNG is left untouched. Deterministic on CPU.
    """
    x = torch.as_tensor(np.asarray(x_train, dtype=np.float32))
    if x.ndim not in (2, 4) or len(x) < 2:
        raise ValueError(
            f"train_feature_net: x_train must be (N, c, h, w) or (N, d) with N ≥ 2, got {tuple(x.shape)}"
        )
    raw = cluster_labels(x_train, seed) if labels is None else np.asarray(labels)
    if raw.shape != (len(x),):
        raise ValueError(f"train_feature_net: labels must have shape ({len(x)},), got {raw.shape}")
    classes, y_np = np.unique(raw, return_inverse=True)
    if len(classes) < 2:
        raise ValueError("train_feature_net: need at least 2 distinct labels (or clusters) to train a classifier")
    y = torch.as_tensor(y_np.astype(np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureNet(tuple(x.shape[1:]), n_classes=len(classes))
    net.set_input_stats(x)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def _stem_paths(path_stem: str | os.PathLike[str]) -> tuple[Path, Path]:
    stem = os.fspath(path_stem)
    return Path(stem + ".safetensors"), Path(stem + ".json")


def save_feature_net(net: FeatureNet, path_stem: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``STEM.safetensors`` (weights and input statistics) and ``STEM.json`` (architecture), each atomically.

    Returns the two paths. Identical nets give byte-identical files; hash them with :func:`file_sha256`
    (re-exported from :mod:`rectflow.io`) to pin the feature space an FD number was measured in.
    """
    weights, arch = _stem_paths(path_stem)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(weights, save(state))
    text = json.dumps({"kind": "FeatureNet", **net.config()}, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(arch, text.encode())
    return weights, arch


def load_feature_net(path_stem: str | os.PathLike[str]) -> FeatureNet:
    """Rebuild a net saved by :func:`save_feature_net`; returned frozen, in eval mode, on CPU."""
    weights, arch = _stem_paths(path_stem)
    for p in (weights, arch):
        require_file(p, FileNotFoundError, f"feature net: {p} not found (expected STEM.safetensors and STEM.json)")
    try:
        cfg = json.loads(arch.read_text())
        if cfg.pop("kind", None) != "FeatureNet":
            raise ValueError("not a FeatureNet architecture file")
        net = FeatureNet(tuple(cfg.pop("shape")), **cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{arch}: invalid feature-net architecture ({e})") from None
    try:
        net.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors header errors and state-dict mismatches alike: name the file
        raise ValueError(f"{weights}: weights do not match {arch.name} ({str(e).splitlines()[0][:200]})") from None
    return net.eval().requires_grad_(False)


@torch.no_grad()
def extract_features(net: FeatureNet, x: np.ndarray | Tensor, batch_size: int = 1024) -> np.ndarray:
    """Features ``(N, F)`` float64 of ``x: (N, *shape)``, computed in float32 batches in eval mode."""
    was_training = net.training
    net.eval()
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x.float()
    device = next(net.parameters()).device
    out = [net.features(xt[i : i + batch_size].to(device)).cpu() for i in range(0, len(xt), batch_size)]
    net.train(was_training)
    return torch.cat(out).double().numpy()


def _gaussian_stats(feats: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"frechet_distance: {name} must be (n, F) with n ≥ 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """FD between Gaussians fitted to ``feats_a: (n, F)`` and ``feats_b: (m, F)``, computed in float64.

    ``(Σ_a Σ_b)^{1/2}`` comes from :func:`scipy.linalg.sqrtm`; if that is not finite (singular
    product, e.g. ``n < F``) it is recomputed with ``eps·I`` added to both covariances. Imaginary
    parts from round-off are dropped when the diagonal's are below 1e-3; larger ones raise
    ``ValueError``. Identical sets give 0 up to round-off (|FD| ~ 1e−10, possibly negative).
    """
    mu_a, sig_a = _gaussian_stats(feats_a, "feats_a")
    mu_b, sig_b = _gaussian_stats(feats_b, "feats_b")
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: feature widths differ ({mu_a.shape[0]} vs {mu_b.shape[0]})")
    covmean = scipy.linalg.sqrtm(sig_a @ sig_b)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(len(sig_a))
        covmean = scipy.linalg.sqrtm((sig_a + offset) @ (sig_b + offset))
    if np.iscomplexobj(covmean):
        worst = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if worst > 1e-3:
            raise ValueError(f"frechet_distance: sqrtm(Σ_a Σ_b) has a large imaginary component ({worst:.3g})")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sig_a) + np.trace(sig_b) - 2.0 * np.trace(covmean))


def frechet_distance_se(feats_a: np.ndarray, feats_b: np.ndarray, reps: int = 30, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`frechet_distance` over the sample ``feats_a: (n, F)``.

    ``feats_b`` (the reference) is held fixed; ``reps`` resamples of ``n`` rows of ``feats_a`` with
    replacement (a private generator seeded by ``seed``), the std (ddof 1) of their FDs. At the
    sample sizes a CPU evaluate affords (n ~ 1,000) an FD moves by about this much between draws:
    a difference between two rows smaller than it is not a finding.
    """
    f = np.asarray(feats_a)
    if reps < 2:
        raise ValueError(f"frechet_distance_se: reps must be ≥ 2, got {reps}")
    rng = np.random.default_rng(seed)
    fds = [frechet_distance(f[rng.integers(0, len(f), len(f))], feats_b) for _ in range(reps)]
    return float(np.std(fds, ddof=1))


def fd(
    net: FeatureNet, samples: np.ndarray | Tensor, reference: np.ndarray | Tensor, batch_size: int = 1024
) -> float:
    """FD between ``samples: (n, *shape)`` and ``reference: (m, *shape)`` in ``net``'s feature space."""
    return frechet_distance(extract_features(net, samples, batch_size), extract_features(net, reference, batch_size))


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _kth_nn_radii(feats: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """Distance from each row of ``feats: (n, F)`` to its k-th nearest other row: ``(n,)``."""
    # In each row the point itself is the smallest entry (distance 0), so index k is the k-th other one.
    sq = [np.partition(_sq_dists(feats[i : i + chunk], feats), k, axis=1)[:, k] for i in range(0, len(feats), chunk)]
    return np.sqrt(np.maximum(np.concatenate(sq), 0.0))


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``(len(a), len(b))``."""
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 1024) -> float:
    """Fraction of ``points`` inside at least one ball ``(centres[j], radii[j])``."""
    inside = [
        (_sq_dists(points[i : i + chunk], centres) <= (radii * radii)[None, :]).any(axis=1)
        for i in range(0, len(points), chunk)
    ]
    return float(np.concatenate(inside).mean())


def precision_recall(feats_gen: np.ndarray, feats_real: np.ndarray, k: int = 3) -> PrecisionRecall:
    """k-NN manifold precision and recall (Kynkäänniemi et al., 2019).

    Precision: fraction of generated features inside the union of balls around real features, each
    with radius the distance to its k-th nearest real neighbour; recall: the same with roles swapped.
    ``feats_gen: (n, F)``, ``feats_real: (m, F)``, both with more than ``k`` rows; distances are
    computed in row chunks, so memory is ``O(1024 · max(n, m))``.
    """
    gen = np.asarray(feats_gen, dtype=np.float64)
    real = np.asarray(feats_real, dtype=np.float64)
    if gen.ndim != 2 or real.ndim != 2 or gen.shape[1] != real.shape[1]:
        raise ValueError(f"precision_recall: need (n, F) and (m, F) arrays, got {gen.shape} and {real.shape}")
    if min(len(gen), len(real)) <= k:
        raise ValueError(f"precision_recall: both sets need more than k={k} rows, got {len(gen)} and {len(real)}")
    precision = _coverage(gen, real, _kth_nn_radii(real, k))
    recall = _coverage(real, gen, _kth_nn_radii(gen, k))
    return PrecisionRecall(precision, recall)
