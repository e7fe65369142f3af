"""A user's points in and out of a saved flow: ``rectflow invert`` and ``rectflow transfer``.

Points are Parquet (feature columns ``d0 … d{D−1}``, as ``rectflow sample`` writes them; every other
column, labels and ids, is carried to the output row for row) or ``.npy`` (``(n, D)`` or
``(n, *shape)``). :func:`read_points` checks them against the model's shape and refuses NaN or
infinite values; :func:`write_points` writes the result in one rename, with a ``rectflow`` JSON in
the Parquet schema metadata saying what made it (model, direction, solver, NFE).

:func:`run_points` moves them along the flow: ``forward`` integrates t: 0 → 1 (π0 → π1),
``backward`` t: 1 → 0 (π1 → π0, the inversion x1 → x0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from rectflow.arrays import DataError
from rectflow.errors import RunFailedError
from rectflow.io import atomic_path
from rectflow.solvers import Solution, solve

__all__ = ["Direction", "flow_source", "read_points", "run_points", "write_points"]

Direction = Literal["forward", "backward"]


def flow_source(card: dict[str, Any]) -> str | None:
    """π0 of the flow a card describes: ``gaussian`` (noise), a built-in set or ``file``; None when
    the card predates the key and does not say (a round-1 flow's inputs name its source split)."""
    meta = card.get("meta", {})
    if meta.get("source"):
        return str(meta["source"])
    inputs = meta.get("inputs")
    if isinstance(inputs, dict) and inputs.get("source-train") == "gaussian":
        return "gaussian"
    return None


def read_points(path: Path, shape: tuple[int, ...], flag: str = "--in") -> tuple[Tensor, dict[str, np.ndarray]]:
    """The points of ``path`` as ``(n, *shape)`` float32 and the Parquet columns to carry
    (name → values, in row order; none for ``.npy``). DataError naming ``flag`` and the file for
    a missing file, another format, the wrong dimension, a non-numeric feature column, NaN or inf."""
    dim = int(np.prod(shape))
    where = f"{flag} {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    carried: dict[str, np.ndarray] = {}
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: not a readable .npy array ({' '.join(str(e).split())[:120]})") from None
        if x.dtype.kind not in "iuf" or x.ndim < 2 or int(np.prod(x.shape[1:])) != dim \
                or (x.ndim > 2 and tuple(x.shape[1:]) != tuple(shape)):
            forms = f"(n, {dim})" + (f" or (n, {', '.join(map(str, shape))})" if len(shape) > 1 else "")
            raise DataError(f"{where}: expected a numeric array of shape {forms} for this model, got {x.dtype} "
                            f"{tuple(x.shape)}")
        x = x.reshape(len(x), dim)
    elif path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
            raise DataError(f"{where}: not a readable Parquet file ({e.__class__.__name__})") from None
        names = [f"d{i}" for i in range(dim)]
        missing = [n for n in names if n not in table.column_names]
        if missing:
            have = sum(1 for c in table.column_names if c.startswith("d") and c[1:].isdigit())
            raise DataError(f"{where}: expected feature columns d0 … d{dim - 1} for this model's dimension {dim}, "
                            f"found {have} (missing {missing[0]})")
        extra = [c for c in table.column_names if c.startswith("d") and c[1:].isdigit() and int(c[1:]) >= dim]
        if extra:
            raise DataError(f"{where}: has feature column {extra[0]}, beyond this model's dimension {dim}")
        cols = []
        for n in names:
            col = table.column(n)
            if not (str(col.type).startswith(("float", "double", "int", "uint", "halffloat"))):
                raise DataError(f"{where}: column {n} is {col.type}; expected numbers")
            if col.null_count:
                raise DataError(f"{where}: column {n} has {col.null_count} null value(s)")
            cols.append(col.to_numpy().astype(np.float32, copy=False))
        x = np.stack(cols, 1) if cols else np.zeros((table.num_rows, 0), np.float32)
        carried = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names if c not in names}
    else:
        raise DataError(f"{where}: expected a .parquet or .npy file, got {path.suffix or 'no suffix'}")
    if len(x) == 0:
        raise DataError(f"{where}: no rows")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise DataError(f"{where}: row {int(np.argmax(bad))} (and {int(bad.sum()) - 1} more) has NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(x)).reshape(len(x), *shape), carried


@torch.inference_mode()
def run_points(
    net: nn.Module, x: Tensor, direction: Direction, solver: str, steps: int | None, *,
    times: Tensor | None = None, batch_size: int = 8192, labels: Tensor | None = None,
) -> tuple[Tensor, int]:
    """``x`` ``(n, *shape)`` carried along the flow ``net`` (forward t: 0 → 1, backward 1 → 0) in
    batches; returns (the result on the CPU, NFE per sample). RunFailedError if it came out NaN.
    ``labels`` ``(n,)``: a conditional flow's class of each point (its conditional field, w = 1)."""
    from rectflow.guidance import Guided

    out, nfe = [], 0
    dev = next(net.parameters()).device
    for b in range(0, len(x), batch_size):
        v = net if labels is None else Guided(net, labels[b:b + batch_size].to(dev), 1.0)
        sol: Solution = solve(v, x[b:b + batch_size].to(dev), solver, steps, times=times,
                              reverse=direction == "backward")
        out.append(sol.x.float().cpu())
        nfe = max(nfe, sol.nfe)
    y = torch.cat(out)
    bad = ~torch.isfinite(y.reshape(len(y), -1)).all(1)
    if bad.any():
        raise RunFailedError(f"{int(bad.sum())} of {len(y)} points came out NaN or infinite ({direction}, {solver}): "
                             "the model diverges there; nothing was written")
    return y, nfe


def write_points(out: Path, x: Tensor | np.ndarray, carried: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """``x`` ``(n, *shape)`` as Parquet columns ``d0 …`` followed by ``carried``, with ``meta`` as the
    schema's ``rectflow`` JSON, in one rename (what ``rectflow sample``, ``invert`` and ``transfer`` write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = (x.numpy() if isinstance(x, Tensor) else np.asarray(x)).reshape(len(x), -1)
    cols: dict[str, Any] = {f"d{i}": flat[:, i] for i in range(flat.shape[1])} | carried
    table = pa.table(cols).replace_schema_metadata({"rectflow": json.dumps(meta)})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def read_labels(path: Path, flag: str = "--labels") -> np.ndarray:
    """One integer class per sample from ``path``: a ``.npy`` array ``(n,)`` or a Parquet column
    ``y``; ``(n,)`` int64. DataError (one line naming ``flag`` and the file) for a missing file,
    another format, NaN, nulls, floats or strings (the range is the model's to check)."""
    where = f"{flag} {path}"
    if not path.is_file():
        raise DataError(f"{where}: no such file")
    if path.suffix == ".npy":
        try:
            y = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: not a readable .npy array ({' '.join(str(e).split())[:120]})") from None
    elif path.suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise DataError(f"{where}: not a readable Parquet file ({e.__class__.__name__})") from None
        if "y" not in table.column_names:
            raise DataError(f"{where}: expected a column y of class labels, found {', '.join(table.column_names[:5])}")
        col = table.column("y")
        if col.null_count:
            raise DataError(f"{where}: column y has {col.null_count} null value(s); expected one class per row")
        y = col.to_numpy(zero_copy_only=False)
    else:
        raise DataError(f"{where}: expected a .npy or .parquet file, got {path.suffix or 'no suffix'}")
    if y.ndim != 1 or len(y) == 0 or y.dtype.kind not in "iu":
        raise DataError(f"{where}: expected a non-empty 1-D array of integer class labels, got {y.dtype} "
                        f"{tuple(y.shape)}")
    return y.astype(np.int64)

