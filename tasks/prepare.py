"""Stage 1, prepare: materialise the source and target train/test splits under ``data/prepared/``.

2D generators draw ``data.n_train + data.n_test`` samples from ``seed``; digits is split by a
permutation of ``seed``, a user's file (or folder of Parquet files) by a stable hash of each row
(:func:`rectflow.tables.hash_split`), so rows held out stay held out when the data grows; both hold
out about ``data.test_fraction``. A user's data is versioned by content (``meta.json``'s
``version``; DVC hashes it too, as a dependency of this stage), and its change since the last
version prepared here is measured (``.rectflow/data``: W2 and MMD between samples). A Gaussian
source is not materialised: its shape is recorded and the noise is drawn from recorded seeds where
it is used. A data source is reshaped to the target's shape and must have the same dimension.

Labels (docs/conditional.md): ``data.conditional`` is resolved here. A conditional run writes each
labelled side's labels beside its rows (``{side}-{split}-y.npy``, int64 ``(n,)``, split exactly as the
rows are) and a top-level ``labels`` record in ``meta.json``; an unconditional run writes what it
always did, byte for byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rectflow.config import BUILTIN_2D, Params
from rectflow.data import (
    CLASSES,
    DataError,
    check_array,
    count_classes,
    generate_2d_labelled,
    load_digits,
    load_labelled_file,
    split_index,
)
from rectflow.io import atomic_path, atomic_write_json, file_sha256
from rectflow.layout import Layout
from rectflow.tables import PARQUET, check_labels, data_version, hash_split_index, parquet_files, read_parquet_labelled


def local_data(p: Params, side: str, layout: Layout | None) -> Path:
    """Where a ``file`` side's data is read from: its path, or for an ``s3://`` URL the workspace's
    mirror of its objects (``.rectflow/data/mirror/SIDE``, only new or changed objects fetched)."""
    path = str(getattr(p.data, f"{side}_path"))
    if not path.startswith("s3://"):
        return Path(path)
    root = layout.state if layout is not None else Path(".rectflow")
    key = (side, path, str(root))
    if key not in _MIRRORED:  # once per process: the version is of the very objects that were read
        from rectflow.storage import mirror_s3_data

        _MIRRORED[key] = mirror_s3_data(path, root / "data" / "mirror" / side, p.storage)
    return _MIRRORED[key]


_MIRRORED: dict[tuple[str, str, str], Path] = {}


Rows = np.ndarray | slice
"""Which rows of a data set a split takes: indices ``(m,)`` or a slice."""


@dataclass(frozen=True)
class Side:
    """One side (source or target) as prepare writes it: ``train`` ``(n_train, *shape)`` and ``test``
    ``(n_test, *shape)`` rows and, for a labelled set, their ``labels`` (``(n_train,)``, ``(n_test,)``
    int64 in [0, ``classes``)) and the class ``names`` (an image folder's class sub-folders) or None."""

    train: np.ndarray
    test: np.ndarray
    labels: tuple[np.ndarray, np.ndarray] | None = None
    classes: int = 0
    names: list[str] | None = None

    @classmethod
    def split(cls, x: np.ndarray, y: np.ndarray | None, rows: tuple[Rows, Rows], classes: int = 0,
              names: list[str] | None = None) -> Side:
        """Rows ``x`` ``(n, *shape)`` and their labels ``y`` ``(n,)`` (or None) split alike by ``rows``."""
        train, test = rows
        labels = None if y is None else (y[train], y[test])
        return cls(x[train], x[test], labels, classes if y is not None else 0, names if y is not None else None)

    def unlabelled(self) -> Side:
        return Side(self.train, self.test)


@dataclass(frozen=True)
class Sides:
    """Everything prepare writes, validated: the ``target``, the ``source`` (a Gaussian one: its shape)
    and whether the run is ``conditional`` (then a labelled side's labels are written)."""

    target: Side
    source: Side | tuple[int, ...]
    conditional: bool


LABELLED = ("digits, 8gaussians, moons, checkerboard, circles, or a file with data.label_column, a .npz key y "
            "or class sub-folders")
"""The data that carries labels, in words (errors name it)."""


def _materialise(kind: str, path: str | None, p: Params, side: str, layout: Layout | None = None) -> Side:
    """The ``side``'s data set, split; with its labels where it has them (a built-in set's natural
    label; a user's file's labels unless ``data.conditional`` is false)."""
    d = p.data
    if kind in BUILTIN_2D:
        x, y = generate_2d_labelled(kind, d.n_train + d.n_test, p.seed + (0 if side == "target" else 7919), d.noise)
        return Side.split(x, y, (slice(None, d.n_train), slice(d.n_train, None)), CLASSES.get(kind, 0))
    if kind == "digits":
        x, y = load_digits()
        return Side.split(x, y, split_index(len(x), d.test_fraction, p.seed, f"data.{side}: {kind}"), CLASSES[kind])
    if kind != "file":
        raise DataError(f"data.{side}: unknown data set {kind!r}")
    # a user's file: split by a stable hash of each row (or its id), so rows held out stay held out
    # when the data grows
    src = local_data(p, side, layout)
    read = d.conditional is not False
    ids = None
    if d.id_column is not None:
        if not (src.suffix.lower() in PARQUET or src.is_dir() and parquet_files(src)):
            raise DataError(f"data.id_column: {d.id_column!r} names a Parquet column, but {src} is not Parquet data")
        x, ids, y = read_parquet_labelled(src, d.id_column, d.label_column, d.classes, read)
        x, names = check_array(x, str(src)), None
    else:
        x, y, names = load_labelled_file(src, d.label_column, d.classes, read)
    rows = hash_split_index(x, d.test_fraction, p.seed, str(src), ids)
    return Side.split(x, y, rows, 0 if y is None else count_classes(y, d.classes), names)


def _version(p: Params, side: str, layout: Layout) -> dict | None:
    """The content version of a side read from the user's files (None for generators and digits);
    for an S3 URL, of the objects as mirrored (the same bytes)."""
    if getattr(p.data, side) != "file":
        return None
    path = getattr(p.data, f"{side}_path")
    return {"path": str(path)} | data_version(local_data(p, side, layout))


def load_sides(p: Params, layout: Layout | None = None) -> Sides:
    """Everything prepare writes, validated, before anything is written (an S3 side is mirrored first)."""
    target = _materialise(p.data.target, p.data.target_path, p, "target", layout)
    shape = tuple(target.train.shape[1:])
    conditional = is_conditional(p, target)
    if conditional:
        target = _with_classes(target, _where(p, "target"), p.data.classes)
    if p.data.source == "gaussian":
        return Sides(target, shape, conditional)
    src = _materialise(p.data.source, p.data.source_path, p, "source", layout)
    src_shape = tuple(src.train.shape[1:])
    if int(np.prod(src_shape)) != int(np.prod(shape)):
        raise DataError(
            f"data.source: dimension {int(np.prod(src_shape))} (shape {src_shape}) differs from "
            f"data.target's {int(np.prod(shape))} (shape {shape})"
        )
    src = replace(src, train=src.train.reshape(len(src.train), *shape), test=src.test.reshape(len(src.test), *shape))
    if conditional and p.data.source == "file" and src.labels is not None:  # class-conditional transport
        _check_source_classes(p, src, target)
        return Sides(target, src, conditional)
    return Sides(target, src.unlabelled(), conditional)  # a built-in source is never labelled


def is_conditional(p: Params, target: Side) -> bool:
    """``data.conditional`` resolved against the target: true needs labels (DataError naming the
    target when it has none); auto is on only when the user's file carries labels (a built-in set
    stays unconditional, as every default run was); false is off."""
    want = p.data.conditional
    if want is True and target.labels is None:
        raise DataError(f"data.conditional: true, but data.target {_named(p, 'target')} carries no labels "
                        f"(labelled: {LABELLED})")
    return want is True or (want == "auto" and p.data.target == "file" and target.labels is not None)


def _with_classes(side: Side, where: str, classes: int | None) -> Side:
    """A labelled ``side`` with K = ``data.classes`` when set (every label below it, else DataError
    naming ``where``), else its own K."""
    if classes is None or side.labels is None:
        return side
    check_labels(np.concatenate(side.labels), where, classes)
    return replace(side, classes=classes)


def _check_source_classes(p: Params, src: Side, target: Side) -> None:
    """A labelled source for class-conditional transport: the target's class count, and a training
    row of every class the target's training rows have (each target row is paired with a source row
    of its class). DataError naming both sides otherwise."""
    if src.classes != target.classes:
        raise DataError(f"data.source: {_named(p, 'source')} has {src.classes} classes, data.target "
                        f"{_named(p, 'target')} has {target.classes}; class-conditional transport needs the same "
                        "classes on both sides (set data.classes when the labels agree but a side lacks the last)")
    assert src.labels is not None and target.labels is not None
    missing = np.setdiff1d(target.labels[0], src.labels[0])
    if len(missing):
        raise DataError(f"data.source: {_named(p, 'source')} has no training row of class {int(missing[0])}, which "
                        f"data.target's training rows have; class-conditional transport draws a source row of each "
                        "target row's class")


def _named(p: Params, side: str) -> str:
    """A side as the user named it: its path (``file``) or its set in quotes."""
    kind = getattr(p.data, side)
    return str(getattr(p.data, f"{side}_path")) if kind == "file" else repr(kind)


def _where(p: Params, side: str) -> str:
    kind = getattr(p.data, side)
    return str(getattr(p.data, f"{side}_path")) if kind == "file" else f"data.{side}: {kind}"


def run(p: Params, layout: Layout) -> dict:
    sides = load_sides(p, layout)  # all validation happens before the first write (of outputs)
    target = sides.target
    net = None
    fd_labels = None  # the feature net learns digits' labels, and a conditional run's; else k-means clusters
    if target.labels is not None and (p.data.target == "digits" or sides.conditional):
        fd_labels = target.labels[0]
    if target.train.ndim == 4:  # images: the frozen feature net of the Fréchet distance,
        from tasks.features import train  # trained (and checked) before anything is written

        net = train(target.train, fd_labels, p.seed, _where(p, "target"))
    meta: dict = {}
    for side in ("source", "target"):
        value = getattr(sides, side)
        if isinstance(value, Side):
            meta[side] = _write_side(layout, side, getattr(p.data, side), value, sides.conditional)
        else:
            meta[side] = {"kind": "gaussian", "shape": list(value)}
            for split in ("train", "test"):
                for path in _files(layout, side, split):
                    path.unlink(missing_ok=True)
    features = None
    if net is not None:
        from tasks.features import save

        features = save(layout, net, fd_labels, sides.conditional)
    changes = {}
    for side in ("source", "target"):
        version = _version(p, side, layout)
        data = getattr(sides, side)
        if version is not None and isinstance(data, Side):  # a user's file
            meta[side]["version"] = version
            changes[side] = _data_change(p, layout, side, data.train, version)
    labels = {"labels": labels_record(sides)} if sides.conditional else {}
    atomic_write_json(layout.prepared / "meta.json", meta | {"features": features} | labels)
    return {"source": meta["source"], "target": meta["target"], "features": features} | labels | (
        {"data": changes} if changes else {})


def _files(layout: Layout, side: str, split: str) -> tuple[Path, Path]:
    """A side's split as written: its rows ``{side}-{split}.npy`` and its labels ``{side}-{split}-y.npy``."""
    return layout.prepared / f"{side}-{split}.npy", layout.prepared / f"{side}-{split}-y.npy"


def _write_side(layout: Layout, side: str, kind: str, data: Side, conditional: bool) -> dict:
    """Write a data side's splits (float32 rows; int64 labels when the run is conditional and the side
    labelled, else no label file) and return its ``meta.json`` record."""
    files = {}
    labels = data.labels if conditional else None
    for i, (split, rows) in enumerate((("train", data.train), ("test", data.test))):
        rows_path, labels_path = _files(layout, side, split)
        files[split] = {"path": str(rows_path.relative_to(layout.root)),
                        "sha256": _save_npy(rows_path, np.ascontiguousarray(rows, dtype=np.float32))}
        if labels is not None:
            files[split]["labels_sha256"] = _save_npy(labels_path, np.ascontiguousarray(labels[i], dtype=np.int64))
        else:
            labels_path.unlink(missing_ok=True)
    return {"kind": kind, "shape": list(data.train.shape[1:]), "n_train": len(data.train), "n_test": len(data.test),
            "files": files}


def _save_npy(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` as ``.npy`` atomically; its sha256."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)
    return file_sha256(path)


def labels_record(sides: Sides) -> dict:
    """``meta.json``'s ``labels`` of a conditional run: ``{"classes": K, "sides": the labelled sides,
    "names": the class names or None, "frequencies": the share of each class (K floats) in the
    target's training split}``."""
    target = sides.target
    assert target.labels is not None
    labelled = [side for side in ("source", "target")
                if isinstance(getattr(sides, side), Side) and getattr(sides, side).labels is not None]
    counts = np.bincount(target.labels[0], minlength=target.classes)
    return {"classes": target.classes, "sides": labelled, "names": target.names,
            "frequencies": (counts / counts.sum()).tolist()}


SAMPLE = 1000  # rows of each version kept to measure how far the next version moved


def _data_change(p: Params, layout: Layout, side: str, train_x: np.ndarray, version: dict) -> dict:
    """This side's data version against the last one prepared in this workspace, and how far the data
    moved (W2 and MMD between samples of :data:`SAMPLE` training rows of each): what a nightly run
    reports before its new champion is trusted. Keeps this version's sample in ``.rectflow/data``."""
    from rectflow.metrics import mmd, w2

    state = layout.state / "data"
    record, sample_path = state / f"{side}.json", state / f"{side}-sample.npy"
    rows = np.random.default_rng(p.seed).permutation(len(train_x))[:SAMPLE]
    sample = np.ascontiguousarray(train_x[np.sort(rows)].reshape(len(rows), -1), dtype=np.float32)
    try:
        last = json.loads(record.read_text())
        old = np.load(sample_path, allow_pickle=False)
    except (OSError, ValueError):
        last, old = None, None
    if last is not None and last.get("version") == version["digest"]:  # the same data prepared again
        return last
    change: dict = {"version": version["digest"], "files": version["files"],
                    "previous": last.get("version") if last else None, "drift": None}
    if old is not None and old.shape[1:] == sample.shape[1:]:
        change["drift"] = {"w2": w2(old, sample), "mmd": mmd(old, sample), "rows": [len(old), len(sample)]}
    if change["previous"]:
        moved = (f"W2 {change['drift']['w2']:.4g}, MMD {change['drift']['mmd']:.4g} between samples of "
                 f"{len(old)} and {len(sample)} rows" if change["drift"] else "a different shape: no drift figure")  # type: ignore[arg-type]
        print(f"[prepare] data.{side}: new data, version {change['version'][:12]} ({change['files']} file(s)) after "
              f"{change['previous'][:12]}: {moved}", flush=True)
    state.mkdir(parents=True, exist_ok=True)
    _save_npy(sample_path, sample)
    atomic_write_json(record, change)
    return change
