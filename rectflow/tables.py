"""Data sets that grow: Parquet read as one table, split by a stable hash, named by a content version.

- :func:`read_parquet`: one Parquet file, or a folder of them (one new file per day, say) read as one
  data set. Files are read batch by batch into one preallocated ``float32`` array, so memory is the
  data set plus one batch, flat in the number of files. Every file must have the first one's numeric
  columns (names, and integer or floating type, in order) and at least one row.
  :func:`read_parquet_labelled` also reads a column of class labels (``data.label_column``), checked
  by :func:`check_labels` as every label is, whatever file it comes from.
- :func:`hash_split`: train/test by a stable hash of each row (its float32 bytes, or its id), so a
  row held out stays held out when rows are added, whatever their order or file.
- :func:`data_version`: the content version of a data file or folder: sha256 over each file's name
  and sha256 (rows removed or edited change it, as rows added do).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from rectflow.arrays import DataError, check_array
from rectflow.errors import InputError
from rectflow.io import file_kind, file_sha256

__all__ = ["MAX_CLASSES", "PARQUET", "check_labels", "data_version", "expected_labels", "hash_split",
           "hash_split_index", "held_out", "parquet_files", "read_parquet", "read_parquet_labelled", "row_hashes"]

PARQUET = (".parquet", ".pq")
MAX_CLASSES = 65_536
"""The most classes labels may name without ``data.classes`` (a label of 10¹² is an id, not a class)."""


def expected_labels(classes: int | None) -> str:
    """What labels must be, in words: ``labels must be integers in [0, K)`` (K: ``data.classes``, or
    :data:`MAX_CLASSES` when it is None)."""
    return f"labels must be integers in [0, {MAX_CLASSES if classes is None else classes})"


def check_labels(y: np.ndarray, where: str, classes: int | None = None, row0: int = 0,
                 key: str = "data.classes") -> np.ndarray:
    """``y`` ``(n,)`` as int64 if it holds integers in [0, ``classes``) (or [0, :data:`MAX_CLASSES`)
    when ``classes`` is None); else :class:`DataError`, one line naming ``where`` (the file, column,
    key or flag), what was expected and the first bad label and its row (``row0``: the row of
    ``y[0]`` in the file), and ``key``, where ``classes`` came from ("": a model's card, unnamed)."""
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: {expected_labels(classes)}, got dtype {y.dtype}")
    bad = (y < 0) | (y >= (MAX_CLASSES if classes is None else classes))
    if bad.any():
        first = int(bad.argmax())
        said = "" if classes is None or not key else f" ({key}: {classes})"
        raise DataError(f"{where}: {expected_labels(classes)}, got {y[first]} at row {first + row0}{said}")
    return y.astype(np.int64)


def parquet_files(folder: Path) -> list[Path]:
    """The Parquet files directly in ``folder`` (sorted by name; hidden files skipped), or [] when it
    holds none (then it is read as a folder of images). A folder with Parquet files and other data
    files is refused: which of them is the data set is not ours to guess."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and file_kind(p) == "file")
    tables = [p for p in files if p.suffix.lower() in PARQUET]
    if tables:
        other = [p for p in files if p.suffix.lower() not in PARQUET]
        if other:
            raise DataError(f"{other[0]}: not Parquet, in a folder of Parquet files ({tables[0].name}, …); expected "
                           "only .parquet files there")
    return tables


def _numeric(schema, skip: tuple[str | None, ...]) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    import pyarrow.types as pat

    return [(f.name, str(f.type)) for f in schema
            if f.name not in skip and (pat.is_integer(f.type) or pat.is_floating(f.type))]


def read_parquet(path: Path, id_column: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of one Parquet file or of every Parquet file in a folder as float32 ``(n, d)`` (numeric
    columns are dimensions, in the file's order), and the ``id_column`` values (or None).

    Raises DataError naming the file: no numeric columns, a null in a row, a file whose columns differ
    from the first file's, a file with no rows, a missing id column or a null id."""
    x, ids, _ = read_parquet_labelled(path, id_column)
    return x, ids


def read_parquet_labelled(path: Path, id_column: str | None = None, label_column: str | None = None,
                          classes: int | None = None, read_labels: bool = True,
                          ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`read_parquet`, with a column of class labels: ``(x, ids, y)``.

    ``label_column`` is not a dimension; with ``read_labels`` its values come back as ``y``, int64
    ``(n,)``, each an integer in [0, ``classes``) (:func:`check_labels`); without, the column is only
    left out of ``x`` (``y`` None). Besides :func:`read_parquet`'s refusals, DataError naming the file:
    the label column missing, not of an integer type (floats, even integral, and strings are refused),
    holding a null, or a label out of range (its row named)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    err = DataError
    if label_column is not None and label_column == id_column:
        raise err(f"data.label_column: {label_column!r} is also data.id_column; expected a column of labels of its own")
    skip = (id_column, label_column)
    labelled = label_column is not None and read_labels
    files = parquet_files(path) if path.is_dir() else [path]
    opened = []
    for f in files:
        try:
            opened.append(pq.ParquetFile(f))
        except Exception as e:  # noqa: BLE001 - a damaged file: name it, not the parser's internals
            first = (str(e).splitlines() or [""])[0][:200]
            raise err(f"{f}: cannot be read ({e.__class__.__name__}: {first})") from None
    cols = _numeric(opened[0].schema_arrow, skip)
    if not cols:
        raise err(f"{files[0]}: no numeric columns")
    total = 0
    for f, pf in zip(files, opened):
        mine = _numeric(pf.schema_arrow, skip)
        if [(c, _kind(t)) for c, t in mine] != [(c, _kind(t)) for c, t in cols]:  # float32 beside float64 is fine
            raise err(f"{f}: columns {_show(mine)} differ from {_show(cols)} of {files[0].name}; every file of the "
                      "data set must have the same numeric columns")
        if id_column is not None and id_column not in pf.schema_arrow.names:
            raise err(f"{f}: no column {id_column!r} (data.id_column)")
        if labelled and label_column is not None:
            _check_label_type(pf.schema_arrow, f, label_column, classes)
        if len(files) > 1 and pf.metadata.num_rows == 0:
            raise err(f"{f}: no rows; expected at least one in every file of the data set")
        total += pf.metadata.num_rows
    names = [c for c, _ in cols]
    out = np.empty((total, len(cols)), np.float32)
    ids: list[np.ndarray] = []
    labels = np.empty(total, np.int64) if labelled else None
    at = 0
    for f, pf in zip(files, opened):
        row = 0
        try:
            extra = [c for c in (id_column, label_column if labelled else None) if c]
            batches = pf.iter_batches(batch_size=65536, columns=names + extra)
            for batch in batches:
                for c in names:
                    col = batch.column(c)
                    if col.null_count:  # a null would silently become NaN (or an integer column floats)
                        first = row + int(pc.index(pc.is_null(col), True).as_py())
                        raise err(f"{f}: column {c!r} has a null value (first in row {first}); expected numbers "
                                  "in every row")
                if len(batch):  # checked in the files' own types (a float64 too large for float32 is named)
                    block = np.stack([batch.column(c).to_numpy(zero_copy_only=False) for c in names], 1)
                    out[at: at + len(batch)] = check_array(block, str(f), row0=row)
                if id_column:
                    col = batch.column(id_column)
                    if col.null_count:
                        raise err(f"{f}: id column {id_column!r} has a null value; expected an id in every row")
                    ids.append(np.asarray(col.to_pylist(), dtype=object))
                if labels is not None and label_column is not None:
                    block = _batch_labels(batch.column(label_column), f, label_column, classes, row)
                    labels[at: at + len(block)] = block
                at += len(batch)
                row += len(batch)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            first = (str(e).splitlines() or [""])[0][:200]
            raise err(f"{f}: cannot be read ({e.__class__.__name__}: {first})") from None
    return out[:at], (np.concatenate(ids) if id_column else None), (None if labels is None else labels[:at])


def _check_label_type(schema, f: Path, label_column: str,  # type: ignore[no-untyped-def]
                      classes: int | None) -> None:
    """DataError naming the file unless it has ``label_column``, of an integer type."""
    import pyarrow.types as pat

    if label_column not in schema.names:
        raise DataError(f"{f}: no column {label_column!r} (data.label_column)")
    kind = schema.field(label_column).type
    if not pat.is_integer(kind):
        raise DataError(f"{f}: column {label_column!r}: {expected_labels(classes)}, got type {kind}")


def _batch_labels(col, f: Path, label_column: str,  # type: ignore[no-untyped-def]
                  classes: int | None, row: int) -> np.ndarray:
    """One batch's labels ``(b,)`` int64, checked (``row``: the file's row of the batch's first)."""
    import pyarrow.compute as pc

    where = f"{f}: column {label_column!r}"
    if col.null_count:
        first = row + int(pc.index(pc.is_null(col), True).as_py())
        raise DataError(f"{where}: {expected_labels(classes)}, got a null at row {first}")
    return check_labels(col.to_numpy(zero_copy_only=False), where, classes, row0=row)


def _kind(arrow_type: str) -> str:
    return "float" if arrow_type in ("halffloat", "float", "double") or arrow_type.startswith("float") else "integer"


def _show(cols: list[tuple[str, str]]) -> str:
    text = ", ".join(f"{c}:{t}" for c, t in cols[:6])
    return f"[{text}{', …' if len(cols) > 6 else ''}]"


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping)."""
    h = (h ^ (h >> np.uint64(30))) * _M1
    h = (h ^ (h >> np.uint64(27))) * _M2
    return h ^ (h >> np.uint64(31))


def row_hashes(x: np.ndarray, seed: int, ids: np.ndarray | None = None) -> np.ndarray:
    """A uint64 per row: of its id when ``ids`` is given (text of each id, blake2b), else of its values'
    float32 bytes (little-endian), salted by ``seed``. The same row gives the same hash in any file,
    order or machine."""
    with np.errstate(over="ignore"):
        h = np.full(len(x), np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(0x9E3779B97F4A7C15), np.uint64)
        if ids is not None:
            words = np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little")
                              for i in ids], dtype=np.uint64)
            return _mix(h ^ _mix(words))
        rows = np.ascontiguousarray(x.reshape(len(x), -1), dtype="<f4").view("<u4").astype(np.uint64)
        for j in range(rows.shape[1]):
            h = _mix(h ^ rows[:, j] ^ (np.uint64(j) << np.uint64(32)))
        return h


def hash_split(x: np.ndarray, test_fraction: float, seed: int, where: str,
               ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) rows of ``x``, each in the order of the rows' hashes: a row is held out when its
    hash, as a fraction of 2**64, is below ``test_fraction``. Adding rows never moves a row between the splits. At least one
    row goes to each side (by hash rank, when the fraction alone gives none), so two rows are the fewest."""
    train, test = hash_split_index(x, test_fraction, seed, where, ids)
    return x[train], x[test]


def hash_split_index(x: np.ndarray, test_fraction: float, seed: int, where: str,
                     ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The row indices (train ``(n_train,)``, test ``(n_test,)``) of :func:`hash_split` of ``x``: index
    any array aligned with ``x`` (its labels) with them to split it as ``x`` is split."""
    n = len(x)
    if n < 2:
        raise DataError(f"{where}: {n} row(s) are too few to split by data.test_fraction={test_fraction} "
                       "(expected at least 2)")
    h = row_hashes(x, seed, ids)
    test = _held_out(h, test_fraction)
    # each split in the order of its rows' hashes, not the files': a prefix of it (evaluate's
    # n_samples rows) is then a uniform sample, whichever files came first; the order is as stable
    # as the split (new rows fall in between)
    order = np.argsort(h, kind="stable")
    return order[~test[order]], order[test[order]]


def held_out(x: np.ndarray, test_fraction: float, seed: int, ids: np.ndarray | None = None) -> np.ndarray:
    """The bool mask ``(n,)`` of the rows :func:`hash_split` holds out (``n`` ≥ 2)."""
    return _held_out(row_hashes(x, seed, ids), test_fraction)


def _held_out(h: np.ndarray, test_fraction: float) -> np.ndarray:
    test = h < np.uint64(min(int(test_fraction * 2.0**64), 2**64 - 1))
    if not test.any():
        test[int(np.argmin(h))] = True
    if test.all():
        test[int(np.argmax(h))] = False
    return test


def data_version(path: Path) -> dict:
    """{"digest": sha256 over the data's files, "files": n}: a file's own sha256, or for a folder sha256
    over each file's "name sha256" line (sorted by name; an image in a class sub-folder is named
    ``class/name``, so moving it to another class changes the version), so it changes when a file is
    added, removed or edited."""
    if not path.is_dir():
        return {"digest": file_sha256(path), "files": 1}
    from rectflow.imaging import IMAGE_SUFFIXES, class_folders

    files = parquet_files(path) or sorted(p for p in path.iterdir() if not p.name.startswith(".")
                                          and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()) or [
        f for images in class_folders(path).values() for f in images]
    lines = "".join(f"{p.relative_to(path).as_posix()} {file_sha256(p)}\n" for p in files)
    return {"digest": hashlib.sha256(lines.encode()).hexdigest(), "files": len(files)}
