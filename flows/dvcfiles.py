"""DVC's own files as rectflow checks them before handing them to DVC: ``dvc.lock`` must be readable.

Light on purpose (no Prefect, no DVC import): ``rectflow run`` checks ``dvc.lock`` before Prefect
starts, and the flow again before its first write, so a damaged lock file is one line, exit 2,
nothing written, no MLflow run, no retry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rectflow.config import ParamsError
from rectflow.io import file_kind, require_file

__all__ = ["LOCK_FIX", "DvcFileError", "check_dvc_lock", "dvc_file_refused", "keep_dvc_lock", "kept_dvc_lock", "repair_dvc_lock",
           "repair_rwlock"]


class DvcFileError(ParamsError):
    """``dvc.lock`` (or ``dvc.yaml``) cannot be read by DVC: one line naming it and what to do."""


LOCK_FIX = ("DVC's record of the last run is damaged: restore it (`git checkout dvc.lock`) or delete it (DVC then "
            "reruns each stage, or restores it from its run cache)")


def check_dvc_lock(root: Path) -> None:
    """``dvc.lock`` (when there is one) is what DVC can read: UTF-8 YAML, ``schema: '2.0'``, and a
    mapping of stages whose ``cmd`` is text and whose ``deps``/``outs`` are lists of ``{path: …}``.
    Else :class:`DvcFileError` with one line naming it, before anything is written or tracked
    (``rectflow run`` checks it before Prefect starts, the flow again before its first write)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(root) / "dvc.lock"
    if file_kind(path) == "missing":
        return
    require_file(path, DvcFileError, "")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DvcFileError(f"dvc.lock: not UTF-8 text; {LOCK_FIX}") from None
    except OSError as e:
        raise DvcFileError(f"dvc.lock: cannot be read ({e.strerror or e.__class__.__name__})") from None
    try:
        doc = YAML(typ="safe", pure=True).load(text)
    except (YAMLError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise DvcFileError(f"dvc.lock: not valid YAML{at}; {LOCK_FIX}") from None
    if doc is None:
        raise DvcFileError(f"dvc.lock: empty (DVC refuses an empty lock file); {LOCK_FIX}")
    problem = _lock_problem(doc)
    if problem:
        raise DvcFileError(f"dvc.lock: {problem}; {LOCK_FIX}")


def keep_dvc_lock(root: Path) -> None:
    """Keep a copy of ``dvc.lock`` as DVC left it after a stage (``.rectflow/dvc.lock``, replaced in
    one rename): DVC rewrites ``dvc.lock`` in place, so a kill during that write leaves it torn, and
    :func:`repair_dvc_lock` puts this copy back. Only a copy that :func:`check_dvc_lock` accepts is kept."""
    import os

    src, kept = Path(root) / "dvc.lock", kept_dvc_lock(root)
    try:
        check_dvc_lock(root)
        data = src.read_bytes()
    except (DvcFileError, OSError):
        return
    kept.parent.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_name(f".{kept.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, kept)


def repair_dvc_lock(root: Path) -> str | None:
    """Put back the copy :func:`keep_dvc_lock` kept when ``dvc.lock`` is one DVC cannot read (a run
    killed while DVC rewrote it), setting the damaged file aside as ``.rectflow/dvc.lock.damaged``;
    the note to print, or None when there was nothing to repair (or no copy to repair it from: then
    :func:`check_dvc_lock` refuses it). Call it under the workspace lock: another run's DVC may be
    writing ``dvc.lock`` otherwise. DVC checks every hash the copy records, so a stage it lists whose
    outputs changed since still runs again."""
    import os

    path, kept = Path(root) / "dvc.lock", kept_dvc_lock(root)
    if file_kind(path) != "file" or file_kind(kept) != "file":
        return None
    try:
        check_dvc_lock(root)
        return None
    except DvcFileError as e:
        problem = str(e).split(";")[0]
    damaged = kept.with_name("dvc.lock.damaged")
    os.replace(path, damaged)
    tmp = path.with_name(f".dvc.lock.{os.getpid()}.tmp")
    tmp.write_bytes(kept.read_bytes())
    os.replace(tmp, path)
    return (f"{problem} (a run killed while DVC wrote it?): put back the copy kept after the last stage that "
            f"finished; the damaged file is {damaged.relative_to(root)}")


def repair_rwlock(root: Path) -> str | None:
    """Remove DVC's table of stage locks (``.dvc/tmp/rwlock``) when it is not JSON: DVC rewrites it in
    place around every stage, so a kill during that write leaves it torn, and DVC then refuses every
    stage ("Unable to read RWLock-file"). Holding DVC's own guard of that table (``rwlock.lock``, an
    flock) while checking, so no live DVC is writing it; the table only lists processes holding
    locks, and under the workspace lock no DVC of this workspace's runs is alive. The note to print,
    or None."""
    import fcntl
    import json

    tmp = Path(root) / ".dvc" / "tmp"
    path = tmp / "rwlock"
    if file_kind(path) != "file":
        return None
    try:
        guard = open(tmp / "rwlock.lock", "a")  # noqa: SIM115 - held across the check and the removal
    except OSError:
        return None
    with guard:
        try:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return None  # a live DVC holds it: not ours to touch
        try:
            json.loads(path.read_bytes().decode("utf-8"))
            return None
        except (ValueError, OSError):
            pass
        path.unlink(missing_ok=True)
        return ".dvc/tmp/rwlock: DVC's table of stage locks was torn (a run killed while DVC wrote it?): removed it"


def kept_dvc_lock(root: Path) -> Path:
    """Where :func:`keep_dvc_lock` keeps its copy: ``.rectflow/dvc.lock``."""
    from rectflow.layout import Layout

    return Layout(Path(root)).state / "dvc.lock"


def _lock_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return f"expected a mapping (schema, stages), got {type(doc).__name__}"
    if str(doc.get("schema")) != "2.0":
        return f"schema: expected '2.0', got {doc.get('schema')!r}"
    stages = doc.get("stages", {})
    if not isinstance(stages, dict):
        return f"stages: expected a mapping of stages, got {type(stages).__name__}"
    for name, entry in stages.items():
        if not isinstance(entry, dict):
            return f"stages.{name}: expected a mapping (cmd, deps, outs), got {type(entry).__name__}"
        cmd = entry.get("cmd")
        if not (isinstance(cmd, str) or isinstance(cmd, list) and all(isinstance(c, str) for c in cmd)):
            return f"stages.{name}.cmd: expected the command as text, got {type(cmd).__name__}"
        for key in ("deps", "outs"):
            items = entry.get(key, [])
            if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("path"), str)
                                                      for i in items):
                return f"stages.{name}.{key}: expected a list of {{path: …}} entries"
        if not isinstance(entry.get("params", {}), dict):
            return f"stages.{name}.params: expected a mapping of params files"
    return None



def dvc_file_refused(line: str) -> str | None:
    """``dvc.lock`` or ``dvc.yaml`` when DVC's output line says it cannot read or validate that file."""
    for name in ("dvc.lock", "dvc.yaml"):
        if f"{name}'" in line and any(w in line for w in ("is invalid", "validation failed", "unable to read")):
            return name
    return None
