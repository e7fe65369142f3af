"""Stage 1, prepare: materialise the source and target train/test splits under ``data/prepared/``.

2D generators draw ``data.n_train + data.n_test`` samples from ``seed``; finite sets (digits, files)
are split by ``data.test_fraction``. A Gaussian source is not materialised: its shape is recorded
and the noise is drawn from recorded seeds where it is used. A data source is reshaped to the
target's shape and must have the same dimension.
"""

from __future__ import annotations

import numpy as np

from rectflow.config import BUILTIN_2D, Params
from rectflow.data import DataError, generate_2d, load_array_file, load_digits, make_split
from rectflow.io import atomic_path, atomic_write_json, file_sha256
from rectflow.layout import Layout


def _materialise(kind: str, path: str | None, p: Params, side: str) -> tuple[np.ndarray, np.ndarray]:
    d = p.data
    if kind in BUILTIN_2D:
        x = generate_2d(kind, d.n_train + d.n_test, p.seed + (0 if side == "target" else 7919), d.noise)
        return x[: d.n_train], x[d.n_train :]
    if kind == "digits":
        x = load_digits()[0]
    elif kind == "file":
        x = load_array_file(path)  # type: ignore[arg-type]
    else:
        raise DataError(f"data.{side}: unknown data set {kind!r}")
    return make_split(x, d.test_fraction, p.seed, str(path) if kind == "file" else f"data.{side}: {kind}")


def load_sides(p: Params) -> dict[str, tuple[np.ndarray, np.ndarray] | tuple[int, ...]]:
    """Everything prepare writes, validated, before anything is written."""
    target = _materialise(p.data.target, p.data.target_path, p, "target")
    shape = tuple(target[0].shape[1:])
    out: dict = {"target": target}
    if p.data.source == "gaussian":
        out["source"] = shape
        return out
    src = _materialise(p.data.source, p.data.source_path, p, "source")
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
    sides = load_sides(p)  # all validation happens before the first write
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
    atomic_write_json(layout.prepared / "meta.json", meta | {"features": features})
    return {"source": meta["source"], "target": meta["target"], "features": features}
