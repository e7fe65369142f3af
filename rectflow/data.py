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
from rectflow.tables import PARQUET, check_labels, parquet_files, read_parquet_labelled

__all__ = [
    "CLASSES",
    "DataError",
    "Distribution",
    "EIGHT_CENTERS",
    "check_array",
    "checkerboard_squares",
    "count_classes",
    "generate_2d",
    "generate_2d_labelled",
    "load_array_file",
    "load_digits",
    "load_labelled_file",
    "load_prepared",
    "make_split",
    "prepared_classes",
    "split_index",
    "GENERATORS",
]


def _rng(seed: int, name: str) -> np.random.Generator:
    tag = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    return np.random.default_rng([seed, tag])


Labels = np.ndarray | None
"""Each row's class, int64 ``(n,)``, or None for a set without a natural label."""


def _moons(n: int, rng: np.random.Generator, noise: float | None) -> tuple[np.ndarray, Labels]:
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.2 if noise is None else noise, random_state=int(rng.integers(2**31)))
    return x * 3 - 1, y.astype(np.int64)  # torchcfm's sample_moons


_S = 1 / math.sqrt(2)
EIGHT_CENTERS = 5 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (_S, _S), (_S, -_S), (-_S, _S), (-_S, -_S)])
"""``(8, 2)``: the modes of ``8gaussians``; a row's label is its index here."""


def _eight_gaussians(n: int, rng: np.random.Generator, noise: float | None) -> tuple[np.ndarray, Labels]:
    # torchcfm's eight_normal_sample(n, 2, scale=5, var=0.1): covariance sqrt(var)·I.
    std = (0.1 if noise is None else noise) ** 0.25
    mode = rng.integers(0, 8, n)
    return EIGHT_CENTERS[mode] + std * rng.standard_normal((n, 2)), mode.astype(np.int64)


def checkerboard_squares(x: np.ndarray) -> np.ndarray:
    """The filled square of each ``checkerboard`` row ``x: (n, 2)``, int64 ``(n,)`` in 0 … 7: ``2·column
    + upper``, with column 0 … 3 the 2-wide strip of x₁ from the left and upper 1 for the higher of the
    column's two filled squares (split at the middle of the empty square between them, so a value
    rounded onto a square's edge keeps its square)."""
    col = np.clip(np.floor(x[:, 0] / 2).astype(np.int64) + 2, 0, 3)
    upper = x[:, 1] / 2 > (col % 2) - 0.5
    return 2 * col + upper.astype(np.int64)


def _checkerboard(n: int, rng: np.random.Generator, noise: float | None) -> tuple[np.ndarray, Labels]:
    # FFJORD's checkerboard, on [-4, 4]².
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2 + np.floor(x1) % 2
    x = np.stack([x1, x2], 1) * 2
    return x, checkerboard_squares(x)


def _scurve(n: int, rng: np.random.Generator, noise: float | None) -> tuple[np.ndarray, Labels]:
    from sklearn.datasets import make_s_curve

    x, _ = make_s_curve(n, noise=0.05 if noise is None else noise, random_state=int(rng.integers(2**31)))
    return x[:, [0, 2]] * 2, None


def _circles(n: int, rng: np.random.Generator, noise: float | None) -> tuple[np.ndarray, Labels]:
    from sklearn.datasets import make_circles

    x, y = make_circles(
        n, factor=0.5, noise=0.05 if noise is None else noise, random_state=int(rng.integers(2**31))
    )
    return x * 3, y.astype(np.int64)


def _swissroll(n: int, rng: np.random.Generator, noise: float | None) -> tuple[np.ndarray, Labels]:
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(n, noise=1.0 if noise is None else noise, random_state=int(rng.integers(2**31)))
    return x[:, [0, 2]] / 5, None  # FFJORD's scaling


def _gaussian(n: int, rng: np.random.Generator, noise: float | None) -> tuple[np.ndarray, Labels]:
    return rng.standard_normal((n, 2)), None


GENERATORS: dict[str, Callable[[int, np.random.Generator, float | None], tuple[np.ndarray, Labels]]] = {
    "moons": _moons,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "scurve": _scurve,
    "circles": _circles,
    "swissroll": _swissroll,
    "gaussian": _gaussian,
}

CLASSES: dict[str, int] = {"8gaussians": 8, "moons": 2, "checkerboard": 8, "circles": 2, "digits": 10}
"""The built-in sets with a natural label, and their number of classes K (labels 0 … K−1)."""


def generate_2d_labelled(name: str, n: int, seed: int, noise: float | None = None) -> tuple[np.ndarray, Labels]:
    """``n`` samples of the built-in 2D set ``name``: float32 ``(n, 2)``, deterministic, and each row's
    natural label, int64 ``(n,)`` in [0, ``CLASSES[name]``), or None.

    The rows are exactly :func:`generate_2d`'s (the same draws; the labels cost no extra draw). Labels:

    - ``8gaussians``: the mode the row was drawn from, 0 … 7, its index in :data:`EIGHT_CENTERS`;
    - ``moons``: which moon, 0 (upper) or 1 (lower), scikit-learn's ``make_moons`` y;
    - ``checkerboard``: which of the 8 filled squares, 0 … 7 (:func:`checkerboard_squares` of the row);
    - ``circles``: 0 the outer circle, 1 the inner one, scikit-learn's ``make_circles`` y;
    - ``scurve``, ``swissroll``, ``gaussian``: None (no natural classes).
    """
    if name not in GENERATORS:
        raise DataError(f"data: unknown 2D set {name!r}; expected one of {sorted(GENERATORS)}")
    x, y = GENERATORS[name](n, _rng(seed, name), noise)
    # What is generated is checked exactly as what is loaded: finite, and within float32's range.
    where = f"data.noise: {noise:g} makes the {name} set" if noise is not None else f"data: the {name} set would"
    return check_array(np.asarray(x), where, generated=True), y


def generate_2d(name: str, n: int, seed: int, noise: float | None = None) -> np.ndarray:
    """``n`` samples of the built-in 2D set ``name``, shape ``(n, 2)``, float32, deterministic
    (:func:`generate_2d_labelled` without the labels)."""
    return generate_2d_labelled(name, n, seed, noise)[0]


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
    (:func:`rectflow.imaging.load_image_folder`, or the images of its class sub-folders). Raises
    :class:`DataError` naming the file. (:func:`load_labelled_file` without the labels.)
    """
    return load_labelled_file(path, read_labels=False)[0]


LABELS_KEY = "y"
""".npz key of the labels, beside the data array."""


def load_labelled_file(path: str | Path, label_column: str | None = None, classes: int | None = None,
                       read_labels: bool = True) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """A user's data file as :func:`load_array_file` reads it, with the labels it carries: ``(x, y, names)``.

    ``x``: float32 ``(n, d)`` or ``(n, c, h, w)``; ``y``: int64 ``(n,)`` in [0, ``classes``) (``classes``
    is ``data.classes``; None: any label below :data:`rectflow.tables.MAX_CLASSES`), or None for a file
    without labels; ``names``: the class names (an image folder's class sub-folders), else None.
    Labels come from a Parquet column ``label_column`` (integers; never a dimension), the key ``y`` of
    a ``.npz`` beside its data array (1-D integers, one per row), or an image folder's class
    sub-folders (sorted names → 0 … K−1). Without ``read_labels`` they are neither read nor checked
    (a label column or key ``y`` is still not data). Raises :class:`DataError` naming the file (and the
    column or key) and what was expected.
    """
    p = Path(path)
    kind = require_file(p, DataError, f"{p}: data file not found", folder_ok=True)
    parquet = p.suffix.lower() in PARQUET if kind == "file" else bool(parquet_files(p))
    if label_column is not None and not parquet:
        raise DataError(f"data.label_column: {label_column!r} names a Parquet column, but {p} is not Parquet data")
    if parquet:
        x, _, y = read_parquet_labelled(p, None, label_column, classes, read_labels)
        return check_array(x, str(p)), y, None
    if kind == "folder":
        return _load_image_folder(p, classes, read_labels)
    x, y = _load_numpy(p, classes, read_labels)
    return x, y, None


def _load_image_folder(p: Path, classes: int | None, read_labels: bool,
                       ) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """An image folder (flat, or of class sub-folders) as ``(x (n, c, h, w), y (n,) | None, names | None)``."""
    from rectflow.imaging import load_labelled_image_folder

    try:
        x, y, names = load_labelled_image_folder(p)
    except ValueError as e:
        raise DataError(str(e)) from None
    x = check_array(x, str(p))
    if names is None or not read_labels:
        return x, None, None
    if classes is not None and len(names) > classes:
        raise DataError(f"{p}: {len(names)} class sub-folders ({names[0]} … {names[-1]}), more than "
                        f"data.classes: {classes}")
    return x, y, names


def _load_numpy(p: Path, classes: int | None, read_labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``.npy`` or ``.npz`` file as ``(x (n, …), y (n,) | None)``: a ``.npz``'s labels are its key ``y``
    beside a data array (``x``, ``data``, ``arr_0`` or else its first other key)."""
    suffix = p.suffix.lower()
    y = None
    try:
        if suffix == ".npy":
            x = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                if not keys:
                    raise DataError(f"{p}: .npz holds no arrays")
                labelled = LABELS_KEY in keys and len(keys) > 1  # y alone is the data, as ever
                data_keys = [k for k in keys if not (labelled and k == LABELS_KEY)]
                key = next((k for k in ("x", "data", "arr_0") if k in data_keys), data_keys[0])
                x = z[key]
                if labelled and read_labels:
                    y = z[LABELS_KEY]
        else:
            raise DataError(f"{p}: unsupported file type {suffix!r}; expected .parquet, .npy or .npz")
    except DataError:
        raise
    except Exception as e:  # corrupt file: name it, not the parser's internals
        if "pickle" in str(e):  # numpy's advice to load it unsafely is not ours to give
            raise DataError(f"{p}: cannot be read (not a plain numeric array; pickled objects are never loaded)") from None
        first = (str(e).splitlines() or [""])[0][:200]
        raise DataError(f"{p}: cannot be read ({e.__class__.__name__}: {first})") from None
    x = check_array(np.asarray(x), str(p))
    if y is None:
        return x, None
    where = f"{p}: key {LABELS_KEY!r}"
    if y.shape != (len(x),):
        raise DataError(f"{where}: expected labels of shape ({len(x)},), one per row of key {key!r}, got shape "
                        f"{tuple(y.shape)}")
    return x, check_labels(y, where, classes)


def count_classes(y: np.ndarray, classes: int | None) -> int:
    """K of labels ``y`` ``(n,)`` (checked: in [0, ``classes``)): ``data.classes`` when set, else the
    largest label + 1."""
    return classes if classes is not None else int(y.max()) + 1


def split_index(n: int, test_fraction: float, seed: int, where: str = "data set") -> tuple[np.ndarray, np.ndarray]:
    """The row indices (train, test) of :func:`make_split` of ``n`` rows: index any array aligned with
    the rows (their labels) with them to split it as the rows are split."""
    n_test = max(1, int(round(n * test_fraction)))
    if n_test >= n:
        need = next(m for m in range(2, 1 << 30) if max(1, int(round(m * test_fraction))) < m)
        raise DataError(f"{where}: {n} row(s) are too few to split by data.test_fraction={test_fraction} "
                        f"(expected at least {need})")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def make_split(x: np.ndarray, test_fraction: float, seed: int, where: str = "data set") -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/test split of a finite data set by ``seed`` (``where`` names it in errors)."""
    train, test = split_index(len(x), test_fraction, seed, where)
    return x[train], x[test]


@dataclass
class Distribution:
    """π0 or π1 as training sees it: a standard Gaussian of ``shape`` or a finite set of rows,
    optionally labelled.

    ``sample(n, generator)`` draws ``n`` rows *with replacement* (fresh independent draws every call,
    as 1-RF training needs); shapes are ``(n, *shape)``. A labelled set (``labels`` ``(N,)`` int64 in
    [0, ``classes``)) also draws rows with their labels (:meth:`sample_labelled`) or rows of given
    classes (:meth:`sample_of`, class-conditional transport between two labelled sets).
    """

    shape: tuple[int, ...]
    data: torch.Tensor | None = None  # (N, *shape) or None for N(0, I)
    labels: torch.Tensor | None = None  # (N,) int64 class of each row, or None
    classes: int = 0  # K: labels lie in [0, K); 0 when unlabelled

    def __post_init__(self) -> None:
        if self.labels is not None:
            if self.data is None or self.labels.shape != (len(self.data),):
                raise ValueError(f"labels: expected shape ({0 if self.data is None else len(self.data)},), "
                                 f"got {tuple(self.labels.shape)}")
            if self.classes < 1:
                raise ValueError("classes: a labelled distribution needs classes ≥ 1")
        self._by_class: list[torch.Tensor] | None = None

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    @property
    def is_gaussian(self) -> bool:
        return self.data is None

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.data is None:
            return torch.randn((n, *self.shape), generator=generator)
        idx = torch.randint(0, len(self.data), (n,), generator=generator)
        return self.data.index_select(0, idx)

    def sample_labelled(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows ``(n, *shape)`` drawn with replacement and their labels ``(n,)`` (int64)."""
        if self.data is None or self.labels is None:
            raise ValueError("sample_labelled: this distribution has no labels")
        idx = torch.randint(0, len(self.data), (n,), generator=generator)
        return self.data.index_select(0, idx), self.labels.index_select(0, idx.to(self.labels.device))

    def sample_of(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One row per entry of ``y`` ``(n,)``, each drawn uniformly from the rows of class ``y[i]``
        (a Gaussian or unlabelled source ignores ``y``): ``(n, *shape)``."""
        if self.labels is None:
            return self.sample(len(y), generator)
        assert self.data is not None
        if self._by_class is None:
            order = torch.argsort(self.labels.cpu(), stable=True)
            counts = torch.bincount(self.labels.cpu(), minlength=self.classes)
            if bool((counts == 0).any()):
                missing = int(torch.nonzero(counts == 0)[0])
                raise ValueError(f"class {missing} has no rows in this data set")
            self._by_class = [order, torch.cumsum(counts, 0) - counts, counts]
        order, start, count = self._by_class
        yc = y.cpu()
        u = torch.rand(len(y), generator=generator, dtype=torch.float64)
        pick = start[yc] + (u * count[yc]).long().clamp_max(count[yc] - 1)
        return self.data.index_select(0, order[pick].to(self.data.device))

    def to(self, device: torch.device | str) -> Distribution:
        return Distribution(self.shape, None if self.data is None else self.data.to(device),
                            None if self.labels is None else self.labels.to(device), self.classes)


# ---- the prepared layout (data/prepared/) ---------------------------------------------------------


def prepared_meta(prepared: Path) -> dict:
    """Read ``data/prepared/meta.json`` (written by the prepare stage)."""
    path = prepared / "meta.json"
    require_file(path, DataError, f"{path}: missing; run the prepare stage first")
    try:
        meta = json.loads(path.read_text())
        for side in ("source", "target"):
            meta[side]["kind"], tuple(meta[side]["shape"])
        labels = meta.get("labels")
        if labels is not None and not (int(labels["classes"]) >= 1 and "target" in labels["sides"]
                                       and set(labels["sides"]) <= {"source", "target"}):
            raise ValueError("labels")
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a valid prepare record; rerun the prepare stage") from None
    return meta


def prepared_classes(prepared: Path) -> int:
    """K, the classes of a conditional run's prepared data (``meta.json``'s ``labels.classes``), or 0
    for an unconditional run."""
    labels = prepared_meta(prepared).get("labels")
    return int(labels["classes"]) if labels else 0


def data_version_key(meta: dict) -> str | None:
    """The content versions of the user's data in a prepare record (``meta.json``), as one string
    (``source=…;target=…``); None when both sides are built in (their params are their version)."""
    parts = [f"{side}={meta[side]['version']['digest']}" for side in ("source", "target")
             if isinstance(meta.get(side), dict) and meta[side].get("version")]
    return ";".join(parts) or None


def load_prepared(prepared: Path, side: str, split: str) -> Distribution:
    """The ``side`` ('source' | 'target') ``split`` ('train' | 'test') written by prepare: rows
    ``(N, *shape)``, and for a side that ``meta.json``'s ``labels.sides`` lists (a conditional run), their
    labels ``(N,)`` int64 in [0, ``labels.classes``) from ``{side}-{split}-y.npy``. Every file's sha256
    is checked against ``meta.json``'s."""
    record = prepared_meta(prepared)
    meta = record[side]
    shape = tuple(meta["shape"])
    if meta["kind"] == "gaussian":
        return Distribution(shape)
    files = (meta.get("files") or {}).get(split, {})
    arr = _load_prepared_array(prepared / f"{side}-{split}.npy", files.get("sha256"))
    if arr.ndim < 1 or tuple(arr.shape[1:]) != shape:
        raise DataError(f"{prepared / f'{side}-{split}.npy'}: shape {tuple(arr.shape)} does not match meta.json's "
                        f"{shape}")
    labels = record.get("labels")
    if not labels or side not in labels["sides"]:
        return Distribution(shape, torch.from_numpy(arr))
    classes = int(labels["classes"])
    path = prepared / f"{side}-{split}-y.npy"
    y = _load_prepared_array(path, files.get("labels_sha256"))
    if y.dtype != np.int64 or y.shape != (len(arr),) or (len(y) and not 0 <= int(y.min()) <= int(y.max()) < classes):
        raise DataError(f"{path}: expected int64 labels of shape ({len(arr)},) in [0, {classes}) (meta.json's "
                        f"labels.classes), one per row of {side}-{split}.npy; rerun the prepare stage")
    return Distribution(shape, torch.from_numpy(arr), torch.from_numpy(y), classes)


def _load_prepared_array(path: Path, expected: str | None) -> np.ndarray:
    """One ``.npy`` of ``data/prepared``, its sha256 checked against ``expected`` (meta.json's)."""
    require_file(path, DataError, f"{path}: missing; run the prepare stage first")
    data = path.read_bytes()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise DataError(f"{path}: sha256 does not match meta.json's; the file was changed or damaged "
                        "(rerun the prepare stage)")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e.__class__.__name__}); rerun the prepare stage") from None
