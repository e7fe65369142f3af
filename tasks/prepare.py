"""Stage 1, prepare: materialise the source and target train/test splits under ``data/prepared/``.

2D generators draw ``data.n_train + data.n_test`` samples from ``seed``; digits is split by a
permutation of ``seed``, a user's file (or folder of Parquet files) by a stable hash of each row
(:func:`rectflow.tables.hash_split`), so rows held out stay held out when the data grows; both hold
out about ``data.test_fraction``. A user's data is versioned by content (``meta.json``'s
``version``; DVC hashes it too, as a dependency of this stage), and its change since the last
version prepared here is measured (``.rectflow/data``: W2 and MMD between samples). A Gaussian
source is not materialised: its shape is recorded and the noise is drawn from recorded seeds where
it is used. A data source is reshaped to the target's shape and must have the same dimension.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rectflow.config import BUILTIN_2D, Params
from rectflow.data import DataError, check_array, generate_2d, load_array_file, load_digits, make_split
from rectflow.io import atomic_path, atomic_write_json, file_sha256
from rectflow.layout import Layout
from rectflow.tables import PARQUET, data_version, hash_split, parquet_files, read_parquet


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


def _materialise(kind: str, path: str | None, p: Params, side: str,
                 layout: Layout | None = None) -> tuple[np.ndarray, np.ndarray]:
    d = p.data
    if kind in BUILTIN_2D:
        x = generate_2d(kind, d.n_train + d.n_test, p.seed + (0 if side == "target" else 7919), d.noise)
        return x[: d.n_train], x[d.n_train :]
    if kind == "digits":
        return make_split(load_digits()[0], d.test_fraction, p.seed, f"data.{side}: {kind}")
    if kind != "file":
        raise DataError(f"data.{side}: unknown data set {kind!r}")
    # a user's file: split by a stable hash of each row (or its id), so rows held out stay held out
    # when the data grows
    src = local_data(p, side, layout)
    ids = None
    if d.id_column is not None:
        if not (src.suffix.lower() in PARQUET or src.is_dir() and parquet_files(src)):
            raise DataError(f"data.id_column: {d.id_column!r} names a Parquet column, but {src} is not Parquet data")
        x, ids = read_parquet(src, d.id_column)
        x = check_array(x, str(src))
    else:
        x = load_array_file(src)
    return hash_split(x, d.test_fraction, p.seed, str(src), ids)


def _version(p: Params, side: str, layout: Layout) -> dict | None:
    """The content version of a side read from the user's files (None for generators and digits);
    for an S3 URL, of the objects as mirrored (the same bytes)."""
    if getattr(p.data, side) != "file":
        return None
    path = getattr(p.data, f"{side}_path")
    return {"path": str(path)} | data_version(local_data(p, side, layout))


def load_sides(p: Params, layout: Layout | None = None) -> dict[str, tuple[np.ndarray, np.ndarray] | tuple[int, ...]]:
    """Everything prepare writes, validated, before anything is written (an S3 side is mirrored first)."""
    target = _materialise(p.data.target, p.data.target_path, p, "target", layout)
    shape = tuple(target[0].shape[1:])
    out: dict = {"target": target}
    if p.data.source == "gaussian":
        out["source"] = shape
        return out
    src = _materialise(p.data.source, p.data.source_path, p, "source", layout)
    src_shape = tuple(src[0].shape[1:])
    if int(np.prod(src_shape)) != int(np.prod(shape)):
        raise DataError(
            f"data.source: dimension {int(np.prod(src_shape))} (shape {src_shape}) differs from "
            f"data.target's {int(np.prod(shape))} (shape {shape})"
        )
    out["source"] = tuple(s.reshape(len(s), *shape) for s in src)
    return out


def _where(p: Params, side: str) -> str:
    kind = getattr(p.data, side)
    return str(getattr(p.data, f"{side}_path")) if kind == "file" else f"data.{side}: {kind}"


def run(p: Params, layout: Layout) -> dict:
    sides = load_sides(p, layout)  # all validation happens before the first write (of outputs)
    net = None
    labels = None
    if len(sides["target"][0].shape) == 4:  # images: the frozen feature net of the Fréchet distance,
        from tasks.features import train  # trained (and checked) before anything is written

        labels = make_split(load_digits()[1], p.data.test_fraction, p.seed)[0] if p.data.target == "digits" else None
        net = train(sides["target"][0], labels, p.seed, _where(p, "target"))  # type: ignore[arg-type]
    meta: dict = {}
    for side in ("source", "target"):
        value = sides[side]
        if isinstance(value[0], np.ndarray):
            train_x, test_x = value  # type: ignore[misc]
            files = {}
            for split, arr in (("train", train_x), ("test", test_x)):
                path = layout.prepared / f"{side}-{split}.npy"
                with atomic_path(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, np.ascontiguousarray(arr, dtype=np.float32))
                files[split] = {"path": str(path.relative_to(layout.root)), "sha256": file_sha256(path)}
            kind = getattr(p.data, side)
            meta[side] = {"kind": kind, "shape": list(train_x.shape[1:]), "n_train": len(train_x), "n_test": len(test_x),
                          "files": files}
        else:
            meta[side] = {"kind": "gaussian", "shape": list(value)}
            for split in ("train", "test"):
                (layout.prepared / f"{side}-{split}.npy").unlink(missing_ok=True)
    features = None
    if net is not None:
        from tasks.features import save

        features = save(layout, net, labels is not None)
    changes = {}
    for side in ("source", "target"):
        version = _version(p, side, layout)
        if version is not None:
            meta[side]["version"] = version
            changes[side] = _data_change(p, layout, side, sides[side][0], version)  # type: ignore[arg-type]
    atomic_write_json(layout.prepared / "meta.json", meta | {"features": features})
    return {"source": meta["source"], "target": meta["target"], "features": features} | (
        {"data": changes} if changes else {})


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
    with atomic_path(sample_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, sample)
    atomic_write_json(record, change)
    return change
