"""Small, safe file I/O: atomic writes (temporary name + rename), hashes, JSON."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_json", "file_kind", "file_sha256", "read_json",
           "require_file"]


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    Nothing is ever visible under the final name half-written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file being written, not a temporary name
        raise type(e)(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.replace(tmp_path, path)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, str(path)) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_SPECIAL = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(path: Path | str) -> str:
    """What ``path`` is, following links, without opening it: 'missing', 'file', 'folder', or the
    kind of a special file ('a named pipe (FIFO)', 'a character device', …), which a reader could
    wait on forever (a FIFO with no writer, ``/dev/zero``)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:
        return "missing"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    return next((name for test, name in _SPECIAL if test(mode)), "not a regular file")


def require_file(path: Path | str, error: type[Exception], missing: str, folder_ok: bool = False) -> str:
    """Refuse anything at ``path`` but a regular file (or a folder, with ``folder_ok``) before it is
    opened: ``error(missing)`` when nothing is there, else ``error`` naming what is there. Returns
    :func:`file_kind`'s answer ('file' or 'folder')."""
    kind = file_kind(path)
    if kind == "missing":
        raise error(missing)
    if kind == "file" or (kind == "folder" and folder_ok):
        return kind
    if kind == "folder":
        raise error(f"{path}: is a folder; expected a file")
    raise error(f"{path}: is {kind}, not a regular file; expected a file (reading it could wait forever)")


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def file_sha256(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
