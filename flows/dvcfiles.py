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

__all__ = ["LOCK_FIX", "DvcFileError", "check_dvc_lock", "dvc_file_refused"]


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
