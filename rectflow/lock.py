"""One writer per workspace: an advisory lock on ``.rectflow/lock``.

Two pipeline runs started at once in the same workspace would interleave their writes to
``dvc.lock``, the couplings, the checkpoints and each other's outputs. :func:`workspace_lock` makes
the second one either wait (bounded) or refuse with one line naming the holder::

    with workspace_lock(Path("."), wait=False):
        ...  # the stage

The lock is ``fcntl.flock`` on ``.rectflow/lock``: the kernel drops it when its holder exits, even
on ``kill -9``, so there is never a stale lock to clean up by hand. The holder writes its pid and
command line into the file, which is how a refused run names it.

Nesting: while held, ``RECTFLOW_LOCK_HELD`` is set to the workspace's absolute path, and the lock
is a no-op for any process (or nested call) that sees it naming the same workspace, so
``rectflow run`` → ``dvc repro`` → ``rectflow stage`` never deadlocks on itself.

Nothing is left behind: the holder removes the lock file (and ``.rectflow/`` if it created it and
it is empty) on release, so a run refused for bad input leaves the workspace byte-for-byte as it
was. An acquirer checks that the file it locked is still the one at the path, so removal is safe.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rectflow.errors import InputError

__all__ = ["ENV_HELD", "LockError", "lock_path", "workspace_lock"]

ENV_HELD = "RECTFLOW_LOCK_HELD"
_POLL_S = 0.05


class LockError(InputError, RuntimeError):
    """The workspace is in use by another run. ``str(err)`` is one line naming the holder."""


def lock_path(root: Path | str) -> Path:
    return Path(root) / ".rectflow" / "lock"


def _holder(path: Path) -> str:
    """``pid N (command)`` of the current holder, as it wrote it, or a fallback."""
    for _ in range(20):  # the holder writes right after locking: give it a moment
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        if text:
            pid, _, cmd = text.partition("\n")
            return f"pid {pid.strip()} ({cmd.strip()})" if cmd.strip() else f"pid {pid.strip()}"
        time.sleep(0.01)
    return "another process"


def _redact(arg: str) -> str:
    """An argument with anything that could be a secret blanked (:func:`rectflow.secrets.redact_arg`:
    URL credentials, values of ``KEY=VALUE`` whose key looks secret, the environment's secrets). The
    command line lands in a file and in error messages."""
    from rectflow.secrets import redact_arg

    return redact_arg(arg)


_SECRET_ARG = re.compile(r"(secret|password|passwd|token|credential|access_key|api_key)", re.IGNORECASE)


def _command() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("cli.py", "__main__.py")):
        argv[0] = "rectflow"
    elif argv:
        argv[0] = Path(argv[0]).name
    redacted, hide_next = [], False
    for a in argv:
        redacted.append("***" if hide_next else _redact(a))
        hide_next = a.startswith("--") and "=" not in a and bool(_SECRET_ARG.search(a))  # --token VALUE
    return " ".join(shlex.quote(a) for a in redacted)[:500].replace("\n", " ")


def _open_locked(path: Path, wait: bool, deadline: float) -> int:
    """Open and flock ``path``; returns the fd. Raises LockError if held (and not waiting/timed out)."""
    told = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # .rectflow/ removed by a releasing holder in between: retry
            continue
        except OSError as e:  # an unwritable workspace (permissions, read-only file system, a file in the way)
            raise LockError(f"{path.parent}: cannot hold the workspace lock there ({e.strerror}); the workspace "
                            "must be writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockError(f"{path}: cannot lock the workspace ({e.strerror})") from None
            if not wait:
                raise LockError(
                    f"workspace {path.parent.parent.resolve()} is in use by {_holder(path)}; "
                    "wait for it to finish (or set RECTFLOW_LOCK_WAIT=1 to queue behind it)"
                ) from None
            if not told:
                told = True
                print(f"[rectflow] workspace in use by {_holder(path)}; waiting for it to finish",
                      file=sys.stderr, flush=True)
            if time.monotonic() >= deadline:
                raise LockError(
                    f"workspace {path.parent.parent.resolve()} still in use by {_holder(path)} "
                    "after waiting; giving up"
                ) from None
            time.sleep(_POLL_S)
            continue
        # The holder before us may have removed the file after we opened it: then we hold a lock
        # on an orphan inode and must start again on the file now at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextmanager
def workspace_lock(root: Path | str, wait: bool = False, timeout: float | None = 3600.0) -> Iterator[None]:
    """Hold the workspace lock of ``root`` for the ``with`` body.

    ``wait=False``: raise :class:`LockError` at once if another process holds it. ``wait=True``:
    poll until it is free, at most ``timeout`` seconds (``None``: no bound), then raise LockError.
    A no-op when ``RECTFLOW_LOCK_HELD`` already names this workspace (a nested run).
    """
    root_abs = str(Path(root).resolve())
    if os.environ.get(ENV_HELD) == root_abs:
        yield
        return
    path = lock_path(root_abs)
    made_dir = not path.parent.exists()
    deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
    fd = _open_locked(path, wait, deadline)
    previous = os.environ.get(ENV_HELD)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{_command()}\n".encode(), 0)
        os.environ[ENV_HELD] = root_abs
        yield
    finally:
        if previous is None:
            os.environ.pop(ENV_HELD, None)
        else:
            os.environ[ENV_HELD] = previous
        try:
            path.unlink()  # still holding the lock: nobody else can be using this file
        except OSError:
            pass
        if made_dir:
            try:
                path.parent.rmdir()  # only if empty: a run that wrote nothing leaves nothing
            except OSError:
                pass
        os.close(fd)
