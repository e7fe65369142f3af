"""Data sets for π0 (source) and π1 (target): 2D generators, scikit-learn's digits, user files.

Every loader returns ``float32`` arrays of shape ``(n, *shape)``: ``(n, d)`` for vectors,
``(n, c, h, w)`` for images (scaled to [−1, 1]). Nothing here downloads anything.

The 2D generators follow the scalings of torchcfm (Tong et al.) where it has them (``moons``,
``8gaussians``) so that W2 figures are comparable with published ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rectflow.arrays import DataError, check_array
from rectflow.io import require_file
from rectflow.tables import PARQUET, parquet_files, read_parquet

__all__ = [
    "DataError",
    "Distribution",
    "check_array",
    "generate_2d",
    "load_array_file",
    "load_digits",
    "make_split",
    "GENERATORS",
]


def _rng(seed: int, name: str) -> np.random.Generator:
    tag = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, tag])


def _moons(n: int, rng: np.random.Generator, noise: float | None) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=0.2 if noise is None else noise, random_state=int(rng.integers(2**31)))
    return x * 3 - 1  # torchcfm's sample_moons


def _eight_gaussians(n: int, rng: np.random.Generator, noise: float | None) -> np.ndarray:
    # torchcfm's eight_normal_sample(n, 2, scale=5, var=0.1): covariance sqrt(var)·I.
    s = 1 / math.sqrt(2)
    centers = 5 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    std = (0.1 if noise is None else noise) ** 0.25
    return centers[rng.integers(0, 8, n)] + std * rng.standard_normal((n, 2))


def _checkerboard(n: int, rng: np.random.Generator, noise: float | None) -> np.ndarray:
    # FFJORD's checkerboard, on [-4, 4]².
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


def _scurve(n: int, rng: np.random.Generator, noise: float | None) -> np.ndarray:
    from sklearn.datasets import make_s_curve

    x, _ = make_s_curve(n, noise=0.05 if noise is None else noise, random_state=int(rng.integers(2**31)))
    return x[:, [0, 2]] * 2


def _circles(n: int, rng: np.random.Generator, noise: float | None) -> np.ndarray:
    from sklearn.datasets import make_circles

    x, _ = make_circles(
        n, factor=0.5, noise=0.05 if noise is None else noise, random_state=int(rng.integers(2**31))
    )
    return x * 3


def _swissroll(n: int, rng: np.random.Generator, noise: float | None) -> np.ndarray:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=1.0 if noise is None else noise, random_state=int(rng.integers(2**31)))
    return x[:, [0, 2]] / 5  # FFJORD's scaling


def _gaussian(n: int, rng: np.random.Generator, noise: float | None) -> np.ndarray:
    return rng.standard_normal((n, 2))


GENERATORS: dict[str, Callable[[int, np.random.Generator, float | None], np.ndarray]] = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "scurve": _scurve,
    "circles": _circles,
    "swissroll": _swissroll,
    "gaussian": _gaussian,
}


def generate_2d(name: str, n: int, seed: int, noise: float | None = None) -> np.ndarray:
    """``n`` samples of the built-in 2D set ``name``, shape ``(n, 2)``, float32, deterministic."""
    if name not in GENERATORS:
        raise DataError(f"data: unknown 2D set {name!r}; expected one of {sorted(GENERATORS)}")
    x = np.asarray(GENERATORS[name](n, _rng(seed, name), noise))
    # What is generated is checked exactly as what is loaded: finite, and within float32's range.
    where = f"data.noise: {noise:g} makes the {name} set" if noise is not None else f"data: the {name} set would"
    return check_array(x, where, generated=True)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images ``(1797, 1, 8, 8)`` in [−1, 1] and labels ``(1797,)``."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[:, None]  # pixel values 0..16
    return x, d.target.astype(np.int64)


def load_array_file(path: str | Path) -> np.ndarray:
    """A user's data file: Parquet (numeric columns are dimensions), ``.npy`` or ``.npz``.

    Returns float32 of shape ``(n, d)`` or ``(n, c, h, w)``. A directory is a folder of Parquet files
    read as one table (:func:`rectflow.tables.read_parquet`) or else a folder of images
    (:func:`rectflow.imaging.load_image_folder`). Raises :class:`DataError` naming the file.
    """
    p = Path(path)
    if require_file(p, DataError, f"{p}: data file not found", folder_ok=True) == "folder":
        from rectflow.imaging import load_image_folder

        if parquet_files(p):  # a folder of Parquet files is one data set (one file per day, say)
            return check_array(read_parquet(p)[0], str(p))
        try:
            return check_array(load_image_folder(p), str(p))
        except ValueError as e:
            raise DataError(str(e)) from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            x = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                if not keys:
                    raise DataError(f"{p}: .npz holds no arrays")
                key = next((k for k in ("x", "data", "arr_0") if k in keys), keys[0])
                x = z[key]
        elif suffix in PARQUET:
            x = read_parquet(p)[0]
        else:
            raise DataError(f"{p}: unsupported file type {suffix!r}; expected .parquet, .npy or .npz")
    except DataError:
        raise
    except Exception as e:  # corrupt file: name it, not the parser's internals
        if "pickle" in str(e):  # numpy's advice to load it unsafely is not ours to give
            raise DataError(f"{p}: cannot be read (not a plain numeric array; pickled objects are never loaded)") from None
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{p}: cannot be read ({e.__class__.__name__}: {first})") from None
    return check_array(np.asarray(x), str(p))


def make_split(x: np.ndarray, test_fraction: float, seed: int, where: str = "data set") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test split of a finite data set by ``seed`` (``where`` names it in errors)."""
    n = len(x)
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        need = next(m for m in range(2, 1 << 30) if max(1, int(round(m * test_fraction))) < m)
        raise DataError(f"{where}: {n} row(s) are too few to split by data.test_fraction={test_fraction} "
                        f"(expected at least {need})")
    perm = np.random.default_rng(seed).permutation(n)
    return x[perm[n_test:]], x[perm[:n_test]]


@dataclass
class Distribution:
    """π0 or π1 as training sees it: a standard Gaussian of ``shape`` or a finite set of rows.

    ``sample(n, generator)`` draws ``n`` rows *with replacement* (fresh independent draws every call,
    as 1-RF training needs); shapes are ``(n, *shape)``.
    """

    shape: tuple[int, ...]
    data: torch.Tensor | None = None  # (N, *shape) or None for N(0, I)

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_gaussian(self) -> bool:
        return self.data is None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.data is None:
            return torch.randn((n, *self.shape), generator=generator)
        idx = torch.randint(0, len(self.data), (n,), generator=generator)
        return self.data.index_select(0, idx)

    def to(self, device: torch.device | str) -> Distribution:
        return Distribution(self.shape, None if self.data is None else self.data.to(device))


# ---- the prepared layout (data/prepared/) ---------------------------------------------------------


def prepared_meta(prepared: Path) -> dict:
    """Read ``data/prepared/meta.json`` (written by the prepare stage)."""
    path = prepared / "meta.json"
    require_file(path, DataError, f"{path}: missing; run the prepare stage first")
    try:
        meta = json.loads(path.read_text())
        for side in ("source", "target"):
            meta[side]["kind"], tuple(meta[side]["shape"])
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a valid prepare record; rerun the prepare stage") from None
    return meta


def data_version_key(meta: dict) -> str | None:
    """The content versions of the user's data in a prepare record (``meta.json``), as one string
    (``source=…;target=…``); None when both sides are built in (their params are their version)."""
    parts = [f"{side}={meta[side]['version']['digest']}" for side in ("source", "target")
             if isinstance(meta.get(side), dict) and meta[side].get("version")]
    return ";".join(parts) or None


def load_prepared(prepared: Path, side: str, split: str) -> Distribution:
    """The ``side`` ('source' | 'target') ``split`` ('train' | 'test') written by prepare."""
    meta = prepared_meta(prepared)[side]
    shape = tuple(meta["shape"])
    if meta["kind"] == "gaussian":
        return Distribution(shape)
    path = prepared / f"{side}-{split}.npy"
    require_file(path, DataError, f"{path}: missing; run the prepare stage first")
    expected = (meta.get("files") or {}).get(split, {}).get("sha256")
    data = path.read_bytes()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise DataError(f"{path}: sha256 does not match meta.json's; the file was changed or damaged "
                        "(rerun the prepare stage)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e.__class__.__name__}); rerun the prepare stage") from None
    if arr.ndim < 1 or tuple(arr.shape[1:]) != shape:
        raise DataError(f"{path}: shape {tuple(arr.shape)} does not match meta.json's {shape}")
    return Distribution(shape, torch.from_numpy(arr))
