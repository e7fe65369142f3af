"""Fréchet distance: closed forms for Gaussians, a real feature net on digits, and its files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from rectflow.fd import (
    FeatureNet,
    extract_features,
    fd,
    file_sha256,
    frechet_distance,
    load_feature_net,
    precision_recall,
    save_feature_net,
    train_feature_net,
)


def _gaussian(rng: np.random.Generator, mean: np.ndarray, cov: np.ndarray, n: int) -> np.ndarray:
    """``n`` samples whose empirical mean and covariance equal ``mean`` and ``cov`` exactly."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) = I
    return mean + z @ np.linalg.cholesky(cov).T


def test_closed_form_diagonal_gaussians() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 0.5]), np.array([1.0, -1.0, 0.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25, 2.0]), np.array([9.0, 1.0, 1.0, 0.5])
    a = _gaussian(rng, mu1, np.diag(var1), 500)
    b = _gaussian(rng, mu2, np.diag(var2), 700)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2.0 * np.sqrt(var1 * var2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_closed_form_full_covariances() -> None:
    """Σ1 = A Aᵀ, Σ2 = Σ1²: then (Σ1 Σ2)^{1/2} = Σ1^{3/2}, whose trace is Σ λ_i^{3/2}."""
    rng = np.random.default_rng(1)
    m = rng.standard_normal((5, 5))
    cov1 = m @ m.T + 0.5 * np.eye(5)
    cov2 = cov1 @ cov1
    lam = np.linalg.eigvalsh(cov1)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    a, b = _gaussian(rng, mu1, cov1, 400), _gaussian(rng, mu2, cov2, 300)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(lam + lam**2 - 2.0 * lam**1.5)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_self_distance_is_zero_even_when_singular() -> None:
    rng = np.random.default_rng(2)
    full = rng.standard_normal((300, 16))
    assert abs(frechet_distance(full, full)) < 1e-8
    few = rng.standard_normal((10, 32))  # n < F: rank-deficient covariance
    assert abs(frechet_distance(few, few)) < 1e-6


def test_input_validation() -> None:
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="feature widths differ"):
        frechet_distance(rng.standard_normal((10, 3)), rng.standard_normal((10, 4)))
    with pytest.raises(ValueError, match=r"n ≥ 2"):
        frechet_distance(rng.standard_normal((1, 3)), rng.standard_normal((10, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((5, 3), np.nan), rng.standard_normal((10, 3)))


def test_precision_recall_closed_cases() -> None:
    rng = np.random.default_rng(4)
    real = rng.standard_normal((400, 8))
    same = precision_recall(real, real, k=3)
    assert same.precision == 1.0 and same.recall == 1.0  # every point lies in its own ball
    far = precision_recall(real + 100.0, real, k=3)
    assert far.precision == 0.0 and far.recall == 0.0
    collapsed = precision_recall(real * 0.01, real, k=3)  # mode collapse: precise, no recall
    assert collapsed.precision > 0.9 and collapsed.recall < 0.1


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data.reshape(-1, 1, 8, 8) / 8.0 - 1.0).astype(np.float32), d.target


@pytest.fixture(scope="module")
def digits_net(digits: tuple[np.ndarray, np.ndarray]) -> FeatureNet:
    x, y = digits
    return train_feature_net(x[:900], y[:900], seed=0, steps=150)


def test_feature_net_learns_digits(digits: tuple[np.ndarray, np.ndarray], digits_net: FeatureNet) -> None:
    x, y = digits
    with torch.no_grad():
        pred = digits_net(torch.as_tensor(x[900:])).argmax(1).numpy()
    assert (pred == y[900:]).mean() > 0.85
    assert extract_features(digits_net, x[:10]).shape == (10, digits_net.feature_dim)


def test_fd_grows_with_noise(digits: tuple[np.ndarray, np.ndarray], digits_net: FeatureNet) -> None:
    x, _ = digits
    rng = np.random.default_rng(0)
    held_out, reference = x[900:], x[:900]
    noise = rng.standard_normal(held_out.shape).astype(np.float32)
    scores = [fd(digits_net, held_out + sigma * noise, reference) for sigma in (0.0, 0.25, 0.5, 1.0)]
    assert all(b > a for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[-1] > 5 * scores[0], scores


def test_label_free_training_is_deterministic(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits
    a = train_feature_net(x[:600], None, seed=3, steps=20)
    b = train_feature_net(x[:600], None, seed=3, steps=20)
    c = train_feature_net(x[:600], None, seed=4, steps=20)
    assert a.n_classes == 10
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)


def test_mlp_variant_on_vectors() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(-3, 1, (200, 2)), rng.normal(3, 1, (200, 2))]).astype(np.float32)
    net = train_feature_net(x, None, seed=0, steps=30)
    assert extract_features(net, x).shape == (400, net.feature_dim)
    assert fd(net, x[::2], x[1::2]) < fd(net, x[::2] + 2.0, x[1::2])


def test_save_load_round_trip(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray], digits_net: FeatureNet) -> None:
    x, _ = digits
    weights, arch = save_feature_net(digits_net, tmp_path / "feature_net")
    assert weights == tmp_path / "feature_net.safetensors" and arch == tmp_path / "feature_net.json"
    first = file_sha256(weights), file_sha256(arch)
    save_feature_net(digits_net, tmp_path / "feature_net")
    assert (file_sha256(weights), file_sha256(arch)) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feature_net.json", "feature_net.safetensors"]

    loaded = load_feature_net(tmp_path / "feature_net")
    assert not loaded.training
    np.testing.assert_array_equal(extract_features(loaded, x[:200]), extract_features(digits_net, x[:200]))
    assert fd(loaded, x[900:], x[:900]) == fd(digits_net, x[900:], x[:900])


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        load_feature_net(tmp_path / "nothing")


def test_load_mismatched_weights_names_the_file(tmp_path: Path) -> None:
    save_feature_net(FeatureNet((1, 8, 8), n_classes=10), tmp_path / "a")
    save_feature_net(FeatureNet((1, 8, 8), n_classes=5), tmp_path / "b")
    (tmp_path / "b.json").replace(tmp_path / "a.json")
    with pytest.raises(ValueError, match=r"a\.safetensors: weights do not match a\.json"):
        load_feature_net(tmp_path / "a")


def test_fd_bootstrap_se_tracks_the_spread_between_independent_draws():
    """The bootstrap SE of an FD (what evaluate reports as ``fd_se``) is seeded, shrinks as the
    sample grows, and is of the size of the FD's real spread over independent draws."""
    from rectflow.fd import frechet_distance, frechet_distance_se

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4_000, 8))
    draws = [rng.standard_normal((500, 8)) + 0.3 for _ in range(40)]
    spread = float(np.std([frechet_distance(d, ref) for d in draws], ddof=1))
    se = frechet_distance_se(draws[0], ref)
    assert se == frechet_distance_se(draws[0], ref) > 0
    assert 0.5 * spread < se < 2.0 * spread
    assert frechet_distance_se(np.concatenate(draws[:8]), ref) < se
    with pytest.raises(ValueError, match="reps"):
        frechet_distance_se(draws[0], ref, reps=1)
