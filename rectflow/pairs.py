"""Noise–sample pairs (Z0, Z1) as Parquet shards plus a ``manifest.json``.

A round directory ``data/couplings/round-K/`` holds ``shard-00000.parquet …`` (columns ``z0`` and
``z1``, each a fixed-size list of float32 of length D = prod(shape)) and ``manifest.json``::

    {"format": 1, "round": K, "shape": [...], "dim": D, "n_pairs": N, "shard_size": S, "seed": s,
     "model": {"name": "rf1", "sha256": ...}, "solver": {...}, "complete": true,
     "shards": [{"name": "shard-00000.parquet", "rows": S, "bytes": ..., "sha256": ...}, ...]}

:class:`PairStream` reads them back in a shuffled order (shard order per epoch, rows within a
buffer of a few shards), verifying each shard's sha256 as it is read, so a training set can be far
larger than memory. Its position is part of a training checkpoint.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from rectflow.errors import InputError
from rectflow.io import atomic_path, file_sha256, read_json, require_file

if TYPE_CHECKING:
    from rectflow.storage import Store

__all__ = [
    "ManifestError", "PairStream", "check_manifest", "read_manifest", "read_shard", "shard_name", "shard_rows",
    "write_shard",
]

MANIFEST = "manifest.json"


class ManifestError(InputError, ValueError):
    """A coupling round is missing, incomplete, or a shard does not match its manifest."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_rows(n_pairs: int, shard_size: int) -> list[int]:
    """The rows of each shard of a round of ``n_pairs`` pairs cut into ``shard_size``-row shards."""
    full, rest = divmod(n_pairs, shard_size)
    return [shard_size] * full + ([rest] if rest else [])


def _fixed_list(x: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(x.reshape(len(x), -1), dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])


def write_shard(
    directory: Path, index: int, z0: np.ndarray, z1: np.ndarray,
    *, before_publish: Callable[[dict[str, Any]], None] | None = None, y: np.ndarray | None = None,
    w: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write ``z0, z1`` ``(rows, *shape)`` as shard ``index`` atomically; return its manifest entry.
    ``y`` ``(rows,)``: the pairs' class labels (a conditional run), written as an int64 column ``y``;
    ``w`` ``(rows,)``: each pair's guidance scale (``distill.guidance_input``), a float32 column ``w``.

    The shard is written under a temporary name and renamed into place. ``before_publish(entry)``
    runs after the temporary file is complete and hashed but before the rename, so a caller can
    record the entry in a manifest first: a shard visible under its final name is then always
    listed (a crash in between leaves a listed entry without its file, which a resume remakes).
    """
    if z0.shape != z1.shape:
        raise ValueError(f"shard {index}: z0 {z0.shape} and z1 {z1.shape} differ")
    columns = {"z0": _fixed_list(z0), "z1": _fixed_list(z1)}
    if y is not None:
        if y.shape != (len(z0),):
            raise ValueError(f"shard {index}: y {y.shape} does not label its {len(z0)} rows")
        columns["y"] = pa.array(np.ascontiguousarray(y, dtype=np.int64))
    if w is not None:
        if w.shape != (len(z0),):
            raise ValueError(f"shard {index}: w {w.shape} does not scale its {len(z0)} rows")
        columns["w"] = pa.array(np.ascontiguousarray(w, dtype=np.float32))
    table = pa.table(columns)
    path = Path(directory) / shard_name(index)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=min(len(z0), 65536))
        entry = {"name": path.name, "rows": int(len(z0)), "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        if before_publish is not None:
            before_publish(entry)
    return entry


LabelColumns = tuple[str, ...]
"""The columns a round has beside ``z0, z1``: ``()``, ``("y",)`` (labels) or ``("y", "w")`` (and scales)."""

_EXTRA_TYPES = {"y": (pa.types.is_integer, np.int64, "integer class labels"),
                "w": (pa.types.is_floating, np.float32, "floating guidance scales")}


def label_columns(man: dict[str, Any]) -> LabelColumns:
    """The extra columns a round's manifest promises (its ``labels`` record)."""
    rec = man.get("labels")
    if not rec:
        return ()
    return ("y", "w") if isinstance(rec, dict) and rec.get("column_w") else ("y",)


def _decode(data: bytes, shape: tuple[int, ...], where: str, labels: LabelColumns = ()) -> tuple[np.ndarray, ...]:
    """``(z0, z1)`` ``(rows, *shape)`` float32 of a shard's bytes, then its ``labels`` columns
    (``y`` int64, ``w`` float32)."""
    extra = tuple(labels)
    try:
        table = pq.read_table(io.BytesIO(data), columns=["z0", "z1", *extra])
    except Exception as e:
        missing = [c for c in extra if c not in _schema_names(data)]
        if missing:
            raise ManifestError(f"{where}: has no column {missing[0]!r}, but its manifest says the round is labelled "
                                "(rerun the couple stage to remake the round)") from None
        raise ManifestError(f"{where}: not a readable pair shard ({e.__class__.__name__})") from None
    _check_columns(table.schema, shape, where, extra)
    out = []
    for col in ("z0", "z1"):
        arr = table.column(col).combine_chunks()
        flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        out.append(flat.reshape(len(table), *shape))
    for col in extra:
        out.append(table.column(col).to_numpy().astype(_EXTRA_TYPES[col][1], copy=False))
    return tuple(out)


def _schema_names(data: bytes) -> list[str]:
    try:
        return list(pq.read_schema(io.BytesIO(data)).names)
    except Exception:
        return []


def _check_columns(schema: pa.Schema, shape: tuple[int, ...], where: str, labels: LabelColumns = ()) -> None:
    """Both columns are fixed-size lists of floats as long as the manifest's shape says (and, for a
    labelled round, ``y`` is an integer column, ``w`` a float one); else a ManifestError naming the
    shard and both dimensions."""
    for col in labels:
        is_type, _, what = _EXTRA_TYPES[col]
        if col not in schema.names:
            raise ManifestError(f"{where}: has no column {col!r}, but its manifest says the round is labelled "
                                "(rerun the couple stage to remake the round)")
        if not is_type(schema.field(col).type):
            raise ManifestError(f"{where}: column {col!r} is {schema.field(col).type}, expected {what}")
    dim = int(np.prod(shape))
    for col in ("z0", "z1"):
        if col not in schema.names:
            raise ManifestError(f"{where}: not a pair shard (no column {col!r})")
        t = schema.field(col).type
        if not pa.types.is_fixed_size_list(t) or not pa.types.is_floating(t.value_type):
            raise ManifestError(f"{where}: not a pair shard (column {col!r} is {t}, expected fixed-size lists of floats)")
        if t.list_size != dim:
            raise ManifestError(f"{where}: holds pairs of dimension {t.list_size}, but the manifest's shape "
                                f"{list(shape)} has dimension {dim}; the manifest does not describe its shards "
                                "(rerun the couple stage to remake the round)")


def check_shard_file(path: Path, entry: dict[str, Any], shape: tuple[int, ...],
                     labels: LabelColumns = ()) -> None:
    """A shard's Parquet footer (no data read) agrees with its manifest entry and the round's shape
    (and has its label column, for a labelled round)."""
    require_file(path, ManifestError, f"{path}: listed in the manifest but missing")
    try:
        meta = pq.read_metadata(path)
        schema = meta.schema.to_arrow_schema()
    except Exception as e:
        raise ManifestError(f"{path}: not a readable pair shard ({e.__class__.__name__})") from None
    _check_columns(schema, shape, str(path), labels)
    if meta.num_rows != entry["rows"]:
        raise ManifestError(f"{path}: {meta.num_rows} rows, the manifest says {entry['rows']}")


def read_manifest(round_dir: Path, require_complete: bool = True) -> dict[str, Any]:
    path = Path(round_dir) / MANIFEST
    require_file(path, ManifestError, f"{path}: missing; run the couple stage first")
    try:
        man = read_json(path)
    except (ValueError, OSError):
        raise ManifestError(f"{path}: not a valid manifest") from None
    return check_manifest(man, str(path), require_complete)


def check_manifest(man: Any, where: str, require_complete: bool = True) -> dict[str, Any]:
    """``man`` (parsed JSON) if it is a valid manifest (and complete, unless told otherwise); else
    :class:`ManifestError` naming ``where`` (a file or an object URL). A complete manifest's totals
    must add up: its shards' rows sum to its ``n_pairs``, cut by its ``shard_size``, and its ``dim``
    is the product of its ``shape``."""
    path = where
    try:
        shards, shape = man["shards"], man["shape"]
        ok = isinstance(shards, list) and isinstance(shape, list) and all(_posint(n) for n in shape) and bool(shape)
        for e in shards if ok else []:
            ok = ok and isinstance(e, dict) and isinstance(e.get("name"), str) and "/" not in e["name"] \
                and isinstance(e.get("sha256"), str) and _posint(e.get("rows"))
        if not ok:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise ManifestError(f"{path}: not a valid manifest") from None
    dim = int(np.prod(shape))
    if "dim" in man and man["dim"] != dim:
        raise ManifestError(f"{path}: dim {man['dim']!r} does not match its shape {shape} (dimension {dim})")
    if require_complete and not man.get("complete"):
        raise ManifestError(f"{path}: the round is incomplete (rerun the couple stage to finish it)")
    if man.get("complete"):
        _check_totals(man, path)
    return man


def _posint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_totals(man: dict[str, Any], path: str) -> None:
    shards, n = man["shards"], man.get("n_pairs")
    fix = "the round is incomplete or was edited (rerun the couple stage to remake it)"
    if not _posint(n):
        raise ManifestError(f"{path}: not a valid manifest (n_pairs: expected a positive integer, got {n!r})")
    names = [e["name"] for e in shards]
    dup = next((x for i, x in enumerate(names) if x in names[:i]), None)
    if dup is not None:
        raise ManifestError(f"{path}: lists {dup} twice; {fix}")
    total = sum(e["rows"] for e in shards)
    if total != n:
        raise ManifestError(f"{path}: lists {total} pair(s) in {len(shards)} shard(s), but its n_pairs is {n}; {fix}")
    size = man.get("shard_size")
    if size is not None:
        if not _posint(size):
            raise ManifestError(f"{path}: not a valid manifest (shard_size: expected a positive integer, got {size!r})")
        expected = shard_rows(n, size)
        if [e["rows"] for e in shards] != expected or names != [shard_name(i) for i in range(len(expected))]:
            raise ManifestError(f"{path}: its {len(shards)} shard(s) are not {n} pairs cut into {size}-row shards "
                                f"({len(expected)} shard(s), shard-00000 … {shard_name(len(expected) - 1)}); {fix}")


def read_shard(round_dir: Path, entry: dict[str, Any], shape: tuple[int, ...],
               labels: LabelColumns = ()) -> tuple[np.ndarray, ...]:
    """Read one shard, verifying its sha256 against the manifest entry first: ``(z0, z1)``, and
    ``y`` too with ``labels``."""
    path = Path(round_dir) / entry["name"]
    require_file(path, ManifestError, f"{path}: listed in the manifest but missing")
    return decode_shard(path.read_bytes(), entry, shape, str(path), labels)


def decode_shard(
    data: bytes, entry: dict[str, Any], shape: tuple[int, ...], where: str, labels: LabelColumns = (),
) -> tuple[np.ndarray, ...]:
    """A shard's bytes (read from a file or an object store), verified against its manifest entry
    (sha256, then rows) and decoded; ``where`` names it in errors. ``(z0, z1[, y])``."""
    path = where
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ManifestError(
            f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…; "
            "the shard is corrupt (rerun the couple stage to regenerate it)"
        )
    cols = _decode(data, shape, str(path), labels)
    if len(cols[0]) != entry["rows"]:
        raise ManifestError(f"{path}: {len(cols[0])} rows, the manifest says {entry['rows']}")
    return cols


def verify_round(round_dir: Path) -> dict[str, Any]:
    """Check every shard of a complete round against its manifest; return the manifest."""
    man = read_manifest(round_dir)
    for entry in man["shards"]:
        path = Path(round_dir) / entry["name"]
        require_file(path, ManifestError, f"{path}: listed in the manifest but missing")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise ManifestError(
                f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry['sha256'][:12]}…; "
                "the shard is corrupt (rerun the couple stage to regenerate it)"
            )
    return man


def _store_manifest(store: Store, prefix: str, require_complete: bool = True) -> dict[str, Any]:
    """The manifest of the round at key ``prefix`` of ``store``, validated like :func:`read_manifest`."""
    import json

    from rectflow.storage import ObjectNotFoundError

    key = f"{prefix}/{MANIFEST}"
    try:
        data = store.read_bytes(key)
    except ObjectNotFoundError:
        raise ManifestError(f"{store.url(key)}: missing; run the couple stage first") from None
    try:
        man = json.loads(data)
    except ValueError:
        raise ManifestError(f"{store.url(key)}: not a valid manifest") from None
    return check_manifest(man, store.url(key), require_complete)


class PairStream:
    """Shuffled, memory-bounded batches of pairs from one round's shards.

    Each epoch visits the shards in a permutation drawn from ``(seed, epoch)``; ``buffer_shards``
    consecutive shards are loaded (verified), concatenated and their rows shuffled from
    ``(seed, epoch, cursor)``. Peak memory is ``buffer_shards × shard_size`` pairs, whatever the
    number of pairs. The position ``(epoch, cursor, row)`` is the whole state, so resuming is exact.

    Every shard's sha256 is checked once up front (a streaming hash, no decoding), so a corrupt
    round is refused before training writes anything, and again as each shard is loaded.

    With ``store`` (a :class:`rectflow.storage.Store`, e.g. S3), ``round_dir`` is the round's key
    prefix in it (``couplings/round-1``) and shards are read through the store, one object per
    load, never all at once. Up front the manifest is read and every shard checked to be present
    (one listing); each shard's sha256 is verified as it is loaded.

    Data parallel (``world`` > 1, one stream per rank): every rank shuffles identically and takes
    its own ``batch_size`` rows out of each global batch of ``world × batch_size``, so the ranks
    together see exactly what one process drawing ``world × batch_size`` would.
    """

    def __init__(
        self, round_dir: Path | str, seed: int, device: torch.device | str = "cpu", buffer_shards: int = 4,
        *, store: Store | None = None, rank: int = 0, world: int = 1,
    ) -> None:
        self.store = store
        if store is None:
            self.dir: Path | str = Path(round_dir)
            self.man = verify_round(self.dir)
        else:
            self.dir = str(round_dir).strip("/")
            self.man = _store_manifest(store, self.dir)
        self.shape = tuple(self.man["shape"])
        self.shards = self.man["shards"]
        self.labelled = label_columns(self.man)  # a conditional round: batches are (z0, z1, y[, w])
        if not self.shards:
            raise ManifestError(f"{self._where(MANIFEST)}: lists no shards")
        if store is None:
            for e in self.shards:
                p = Path(self.dir) / e["name"]
                require_file(p, ManifestError, f"{p}: listed in the manifest but missing")
                if p.stat().st_size != e.get("bytes", p.stat().st_size):
                    raise ManifestError(f"{p}: missing or of the wrong size for its manifest")
                check_shard_file(p, e, self.shape, self.labelled)  # rows, dimension, labels: from the footer
        else:
            present = set(store.list(f"{self.dir}/"))
            for e in self.shards:
                if f"{self.dir}/{e['name']}" not in present:
                    raise ManifestError(f"{self._where(e['name'])}: listed in the manifest but missing")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world size {world}")
        self.rank, self.world = rank, world
        self.seed, self.device, self.buffer_shards = seed, torch.device(device), max(1, buffer_shards)
        self.epoch, self.cursor, self.row = 0, 0, 0
        self._buf: tuple[Tensor, ...] | None = None

    @property
    def n_pairs(self) -> int:
        return sum(e["rows"] for e in self.shards)

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))

    def _load(self) -> tuple[Tensor, ...]:
        order = self._order()
        picks = order[self.cursor : self.cursor + self.buffer_shards]
        parts = [self._read(self.shards[i]) for i in picks]
        cols = [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]
        perm = np.random.default_rng([self.seed, self.epoch, self.cursor]).permutation(len(cols[0]))
        return tuple(torch.from_numpy(c[perm]).to(self.device) for c in cols)

    def _where(self, name: str) -> str:
        if self.store is None:
            return str(Path(self.dir) / name)
        return self.store.url(f"{self.dir}/{name}")

    def _read(self, entry: dict[str, Any]) -> tuple[np.ndarray, ...]:
        if self.store is None:
            return read_shard(Path(self.dir), entry, self.shape, self.labelled)
        from rectflow.storage import ObjectNotFoundError

        try:
            data = self.store.read_bytes(f"{self.dir}/{entry['name']}")
        except ObjectNotFoundError:
            raise ManifestError(f"{self._where(entry['name'])}: listed in the manifest but missing") from None
        return decode_shard(data, entry, self.shape, self._where(entry["name"]), self.labelled)

    def next_batch(self, batch_size: int) -> tuple[Tensor, ...]:
        """``(z0, z1)`` ``(batch_size, *shape)``, with ``y`` (and ``w``) ``(batch_size,)`` for a labelled round."""
        if self.world == 1:
            return self._take(batch_size)
        mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return tuple(c[mine] for c in self._take(batch_size * self.world))

    def _take(self, batch_size: int) -> tuple[Tensor, ...]:
        pieces: list[tuple[Tensor, ...]] = []
        need = batch_size
        while need > 0:
            if self._buf is None:
                self._buf = self._load()
            n = len(self._buf[0])
            take = min(need, n - self.row)
            pieces.append(tuple(c[self.row : self.row + take] for c in self._buf))
            self.row += take
            need -= take
            if self.row >= n:
                self._buf, self.row = None, 0
                self.cursor += self.buffer_shards
                if self.cursor >= len(self.shards):
                    self.epoch, self.cursor = self.epoch + 1, 0
        if len(pieces) == 1:
            return pieces[0]
        return tuple(torch.cat(cols) for cols in zip(*pieces))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "row": self.row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor, self.row = int(state["epoch"]), int(state["cursor"]), int(state["row"])
        self._buf = None
