"""The stage runner: resolve params, hold the workspace lock, run one stage, write its record.

:func:`run_stage` is what ``rectflow stage NAME`` (and so ``dvc repro``) calls. It resolves the params
once (:func:`rectflow.params.resolve`), looks the stage up in the registry (:mod:`rectflow.stages`),
imports its module by name and calls ``run(params, layout, **services)``; a ``<stage>.nproc`` > 1 of a
data-parallel stage makes this process the launcher of ``torchrun`` instead. ``services`` are what the
orchestration side hands a stage (a shard executor for couple and reflow); the runner itself
imports no orchestration.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rectflow.config import Params, ParamsError
from rectflow.stages import DDP_STAGES, stage

__all__ = ["LAUNCHED_ENV", "OUTCOME_ENV", "StageFailedError", "run_stage", "stage_params", "user_errors"]

LAUNCHED_ENV = "RECTFLOW_TORCHRUN_LAUNCHED"  # set by the launcher for its ranks: it prints the summary
# Set by the flow for `dvc repro`: the file where a failing stage writes its exit status (2 bad input,
# 1 failed) and its one line, which DVC's own exit status (always 1 for a failed command) loses.
OUTCOME_ENV = "RECTFLOW_STAGE_OUTCOME"
CLI_MODULE = "flows.cli"  # what torchrun runs for each rank: `python -m flows.cli stage NAME ...`


class StageFailedError(RuntimeError):
    """A stage's worker processes failed (their own errors are on stderr above this line)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2), not a bug: every layer's own error derives from
    :class:`rectflow.errors.InputError`, so this depends on no stage's modules."""
    from rectflow.errors import InputError

    return (InputError,)


def stage_params(name: str, params: Path, overrides: list[str]) -> Params:
    """The resolved params of stage ``name``, or ParamsError (one line). Imports no torch."""
    from rectflow.params import resolve

    stage(name)  # an unknown stage: one line naming the choices
    try:
        return resolve(params, overrides).params
    except ParamsError as e:
        raise ParamsError(" ".join(str(e).splitlines())) from None  # one line, whatever the key holds


def run_stage(name: str, params: Path, overrides: list[str], root: Path = Path("."), **services: Any) -> dict:
    """Resolve params, run stage ``name``, write ``metrics/<name>.json``; returns the stage's record.

    Holds the workspace lock (:mod:`rectflow.lock`) while the stage runs. ``services`` are passed
    to the stage's ``run`` (``shard_executor`` for couple and reflow).
    """
    import torch.distributed as dist

    from rectflow.io import atomic_write_json
    from rectflow.layout import Layout
    from rectflow.lock import workspace_lock
    from rectflow.settings import settings

    p = stage_params(name, params, overrides)  # bad params fail here, before anything is touched
    cfg = settings()
    _configure_threads(cfg.threads)
    layout = Layout(root)
    module = importlib.import_module(stage(name).module)
    distributed = (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    # One writer per workspace (rectflow/lock.py): a second run refuses naming the holder, or with
    # RECTFLOW_LOCK_WAIT=1 queues behind it. Under torchrun the ranks share one run: no lock.
    lock = (workspace_lock(root, wait=cfg.lock_wait, timeout=cfg.lock_timeout) if not distributed
            else contextlib.nullcontext())
    nproc = getattr(getattr(p, name, None), "nproc", 1) if name in DDP_STAGES else 1
    if distributed and name not in DDP_STAGES:
        raise ParamsError(f"stage {name}: runs in one process, not under torchrun "
                          f"(data-parallel stages: {', '.join(DDP_STAGES)})")
    with lock, contextlib.ExitStack() as stack:
        if not distributed:  # before any compute: the outputs can be written, the sizes fit (exit 2)
            preflight(name, p, Path(root))
        if nproc > 1 and not distributed:  # `TRAIN.nproc` > 1: this process becomes the launcher
            return _run_under_torchrun(name, params, overrides, root, nproc)
        stack.enter_context(_process_group(cfg.dist_timeout))  # under torchrun: one process group per stage
        t0 = time.perf_counter()
        from tasks._common import begin_stage

        begin_stage(name)  # what it keeps against a crash is its own (tasks._common.claim_finished)
        record = _run_module(module, name, p, layout, services)
        record = {"stage": name, "wall_seconds": round(time.perf_counter() - t0, 3)} | record
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            atomic_write_json(layout.stage_metrics(name), record)
            from tasks._common import mark_completed

            mark_completed(layout, name)
    return record


def preflight(name: str, p: Params, root: Path) -> None:
    """What :mod:`rectflow.preflight` checks before a stage computes: every output it writes can be
    written (WorkspaceError), and no size key needs more memory than there is (ParamsError)."""
    from rectflow.device import pick_device
    from rectflow.preflight import check_memory, check_writable, stage_needs, stage_paths

    check_writable(f"stage {name}", stage_paths(name, p, root), root)
    check_memory(stage_needs(name, p, root), pick_device())


_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EISDIR, errno.ENOTDIR,
                 errno.EFBIG}


def _run_module(module: Any, name: str, p: Params, layout: Any, services: dict[str, Any]) -> dict:
    """``module.run``, with what the machine refuses mid-run (memory, a disk that fills up or turns
    read-only) turned into one line: exit 2 (ParamsError / WorkspaceError) when the stage had written
    nothing yet, else exit 1 (RunFailedError; what it wrote is complete files only)."""
    from rectflow.errors import RunFailedError
    from rectflow.preflight import WorkspaceError, is_out_of_memory, output_state, stage_needs, stage_paths

    paths = stage_paths(name, p, layout.root)
    before = output_state(paths)
    try:
        return module.run(p, layout, **services) if services else module.run(p, layout)
    except Exception as e:
        oom = is_out_of_memory(e)
        if not oom and not (isinstance(e, OSError) and e.errno in _WRITE_ERRNOS):
            raise
        detail = " ".join(str(e).split())[:200]
        untouched = output_state(paths) == before
        if oom:
            sizes, seen = [], set()
            for need in sorted(stage_needs(name, p, layout.root), key=lambda x: -x.bytes):
                if need.key not in seen:
                    seen.add(need.key)
                    sizes.append(f"{need.key}={need.value}")
            what = f" with {', '.join(sizes[:4])}; lower the one that is too large" if sizes else ""
            message = f"stage {name}: ran out of memory ({e.__class__.__name__}: {detail}){what}"
            if untouched:
                raise ParamsError(message + " (nothing was written)") from None
        else:
            where = Path(str(e.filename)) if e.filename else None
            if where is not None and where.is_absolute() and where.is_relative_to(Path(layout.root).absolute()):
                where = where.relative_to(Path(layout.root).absolute())
            message = f"{where or name}: cannot be written ({e.strerror}) by stage {name}"
            if untouched:
                raise WorkspaceError(message + " (nothing was written)") from None
        raise RunFailedError(message + "; what it wrote before is kept (complete files only: every file is "
                             "written under a temporary name and renamed)") from None


def _configure_threads(threads: int) -> None:
    import torch

    per_process = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun
    torch.set_num_threads(threads or max(1, per_process))


def _run_under_torchrun(name: str, params: Path, overrides: list[str], root: Path, nproc: int) -> dict:
    """Run stage ``name`` as ``torchrun --standalone --nproc_per_node NPROC -m flows.cli stage
    NAME ...`` (same params and overrides, in ``root``); return the record rank 0 wrote."""
    import subprocess

    from rectflow.io import read_json
    from rectflow.layout import Layout

    metrics = Layout(root).stage_metrics(name)
    before = metrics.stat().st_mtime_ns if metrics.is_file() else None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", CLI_MODULE, "stage", name, "--params", str(Path(params).absolute())]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, LAUNCHED_ENV: "1"}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"[{name}] data parallel: torchrun --standalone --nproc_per_node {nproc}", file=sys.stderr, flush=True)
    rc = subprocess.run(cmd, cwd=root, env=env).returncode
    if rc != 0:
        raise StageFailedError(f"stage {name}: torchrun with {nproc} processes exited with status {rc} "
                               "(the failing rank's error is above)")
    if not metrics.is_file() or metrics.stat().st_mtime_ns == before:
        raise StageFailedError(f"stage {name}: torchrun finished but rank 0 wrote no {metrics}")
    return read_json(metrics)


@contextlib.contextmanager
def _process_group(timeout_s: float) -> Iterator[None]:
    """Under torchrun (``WORLD_SIZE`` > 1, no group yet): ``init_process_group`` (nccl on CUDA,
    gloo on CPU) for the stage, ``destroy_process_group`` after. Elsewhere: nothing."""
    import datetime

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    from rectflow.device import pick_device

    dev = pick_device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # Generous: in reflow, the other ranks wait at a barrier while rank 0 couples the next round.
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
