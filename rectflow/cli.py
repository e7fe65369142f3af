"""The ``rectflow`` command (CONTRACT.md, "Commands").

``rectflow stage NAME`` runs one stage (what ``dvc.yaml`` calls); ``rectflow run`` the Prefect
pipeline flow; ``rectflow sample`` draws samples from a saved model; ``rectflow serve`` serves the
nightly deployment. A bad argument, key or value exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rectflow: rectified-flow pipeline (pretrain, couple, reflow, distill, quantize, evaluate).")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params file")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override KEY=VALUE (dotted key), repeatable")]


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (exit 2), not a bug."""
    from rectflow.config import ParamsError
    from rectflow.data import DataError
    from rectflow.lock import LockError
    from rectflow.nets import ModelError
    from rectflow.pairs import ManifestError

    errs: list[type[BaseException]] = [ParamsError, DataError, ModelError, ManifestError, LockError]
    try:
        from rectflow.storage import StorageError

        errs.append(StorageError)
    except ImportError:
        pass
    return tuple(errs)


def fail(message: str, code: int = 2) -> None:
    print(f"rectflow: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _guard(fn, *args, **kwargs):
    from rectflow.train import NonFiniteLossError

    try:
        return fn(*args, **kwargs)
    except _user_errors() as e:
        fail(str(e))
    except NonFiniteLossError as e:
        fail(str(e), code=1)
    except StageFailedError as e:
        fail(str(e), code=1)


def _stage_params(name: str, params: Path, overrides: list[str]):
    """The validated params of stage ``name``, or ParamsError (one line). Imports no torch."""
    from rectflow.config import ParamsError, load_params
    from tasks import STAGES

    if name not in STAGES:
        raise ParamsError(f"stage: unknown {name!r}; expected one of {', '.join(STAGES)}")
    try:
        p = load_params(params, overrides)
    except ParamsError as e:
        raise ParamsError(" ".join(str(e).splitlines())) from None  # one line, whatever the key holds
    except UnicodeDecodeError:
        raise ParamsError(f"{params}: not UTF-8 text") from None
    except RecursionError:
        raise ParamsError(f"{params} or --set: a value is nested too deeply") from None
    try:
        return p.effective()
    except ParamsError:
        raise  # a check on the budgeted values (it names its key): never run with the un-budgeted ones
    except (EOFError, OSError, ValueError):
        return p  # the data file could not be probed (empty, damaged): the stage names it itself


def run_stage(name: str, params: Path, overrides: list[str], root: Path = Path(".")) -> dict:
    """Load params, run stage ``name``, write ``metrics/<name>.json``; returns the stage's record.

    Holds the workspace lock (:mod:`rectflow.lock`) while the stage runs.
    """
    import contextlib
    import importlib

    from rectflow.config import ParamsError
    from rectflow.io import atomic_write_json
    from rectflow.layout import Layout

    p = _stage_params(name, params, overrides)  # bad params fail here, before anything is touched
    _configure_threads()
    layout = Layout(root)
    module = importlib.import_module(f"tasks.{name}")
    import torch.distributed as dist

    from rectflow.lock import workspace_lock

    distributed = (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    # One writer per workspace (rectflow/lock.py): a second run refuses naming the holder, or with
    # RECTFLOW_LOCK_WAIT=1 queues behind it. Under torchrun the ranks share one run: no lock.
    wait = os.environ.get("RECTFLOW_LOCK_WAIT", "").strip().lower() in ("1", "true", "yes")
    try:
        timeout = float(os.environ.get("RECTFLOW_LOCK_TIMEOUT", "") or 3600)
    except ValueError:
        raise ParamsError(f"RECTFLOW_LOCK_TIMEOUT: expected seconds, got {os.environ['RECTFLOW_LOCK_TIMEOUT']!r}") from None
    lock = workspace_lock(root, wait=wait, timeout=timeout) if not distributed else contextlib.nullcontext()
    nproc = getattr(getattr(p, name, None), "nproc", 1) if name in DDP_STAGES else 1
    if distributed and name not in DDP_STAGES:
        raise ParamsError(f"stage {name}: runs in one process, not under torchrun "
                          f"(data-parallel stages: {', '.join(DDP_STAGES)})")
    with lock, contextlib.ExitStack() as stack:
        if nproc > 1 and not distributed:  # `TRAIN.nproc` > 1: this process becomes the launcher
            return _run_under_torchrun(name, params, overrides, root, nproc)
        stack.enter_context(_process_group())  # under torchrun: one process group per stage
        t0 = time.perf_counter()
        record = module.run(p, layout)
        record = {"stage": name, "wall_seconds": round(time.perf_counter() - t0, 3)} | record
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            atomic_write_json(layout.stage_metrics(name), record)
    return record


def _configure_threads() -> None:
    import torch

    per_process = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun
    raw = os.environ.get("RECTFLOW_THREADS", "").strip() or "0"
    if not raw.isdigit():
        from rectflow.config import ParamsError

        raise ParamsError(f"RECTFLOW_THREADS: expected a whole number of threads, got {raw!r}")
    n = int(raw) or max(1, per_process)
    torch.set_num_threads(n)


# ---- data-parallel training under torchrun -------------------------------------------------------

DDP_STAGES = ("pretrain", "reflow", "distill")
_LAUNCHED = "RECTFLOW_TORCHRUN_LAUNCHED"  # set by the launcher for its ranks: it prints the summary


class StageFailedError(RuntimeError):
    """A stage's worker processes failed (their own errors are on stderr above this line)."""


def _run_under_torchrun(name: str, params: Path, overrides: list[str], root: Path, nproc: int) -> dict:
    """Run stage ``name`` as ``torchrun --standalone --nproc_per_node NPROC -m rectflow.cli stage
    NAME ...`` (same params and overrides, in ``root``); return the record rank 0 wrote."""
    import subprocess

    from rectflow.io import read_json
    from rectflow.layout import Layout

    metrics = Layout(root).stage_metrics(name)
    before = metrics.stat().st_mtime_ns if metrics.is_file() else None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "rectflow.cli", "stage", name, "--params", str(Path(params).absolute())]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, _LAUNCHED: "1"}
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
def _process_group():
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
    timeout = datetime.timedelta(seconds=float(os.environ.get("RECTFLOW_DIST_TIMEOUT", "") or 4 * 3600))
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="prepare | pretrain | couple | reflow | distill | quantize | evaluate")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Run one pipeline stage (dvc.yaml calls this)."""
    from rectflow.config import ParamsError

    try:
        try:  # bad params are refused before the heavy imports: one line, exit 2, at once
            _stage_params(name, params, set_ or [])
        except ParamsError as e:
            fail(str(e))
        record = _guard(run_stage, name, params, set_ or [])
    except typer.Exit as e:
        # Under main()'s standalone_mode=False click *returns* a typer.Exit's code instead of
        # exiting with it; exit here so the status (2 bad input, 1 failure) reaches the caller.
        sys.exit(e.exit_code)
    if os.environ.get("RANK", "0") != "0" or os.environ.get(_LAUNCHED):
        return  # under torchrun: rank 0 prints, or the launcher when it started the ranks itself
    summary = {k: v for k, v in record.items() if not isinstance(v, (dict, list))}
    print(json.dumps(summary), flush=True)


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral Prefect unless PREFECT_API_URL is set)."""
    from rectflow.config import load_params

    _guard(lambda: load_params(params, set_ or []).effective())  # bad input fails here, before Prefect starts
    from flows.prefect_server import prestart

    starting = prestart()  # Prefect's temporary server starts while the rest is imported
    from flows.pipeline import run_cli

    _guard(run_cli, params, set_ or [], starting)


@app.command()
def sample(
    model: Annotated[str, typer.Option(help="models/NAME (path) or an MLflow URI models:/NAME@ALIAS")],
    out: Annotated[Path, typer.Option(help="output .parquet")],
    n: Annotated[int, typer.Option(min=1)] = 1000,
    steps: Annotated[int, typer.Option(min=1)] = 1,
    solver: Annotated[str, typer.Option()] = "euler",
    seed: Annotated[int, typer.Option(min=0)] = 0,
    schedule: Annotated[str, typer.Option(
        help="uniform | bellman: the model's saved BOSS time grid for K = --steps (models/NAME.schedule.json)"
    )] = "uniform",
) -> None:
    """Generate N samples with a saved model and write them as Parquet (columns d0, d1, …)."""
    _guard(_sample, model, out, n, steps, solver, seed, schedule)


def _sample(model: str, out: Path, n: int, steps: int, solver: str, seed: int, schedule: str = "uniform") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from rectflow.device import pick_device
    from rectflow.io import atomic_path
    from rectflow.nets import ModelError, load_model
    from rectflow.solvers import SOLVERS, solve

    if solver not in SOLVERS:
        fail(f"--solver: unknown {solver!r}; expected one of {', '.join(SOLVERS)}")
    if schedule not in ("uniform", "bellman"):
        fail(f"--schedule: unknown {schedule!r}; expected uniform or bellman")
    if schedule == "bellman" and solver == "rk45":
        fail("--schedule: 'bellman' needs a fixed-step solver (euler, heun, midpoint), got --solver rk45")
    if out.suffix not in (".parquet", ".pq"):
        fail(f"--out: expected a .parquet path, got {out}")
    if model.startswith("models:/") or model.startswith("runs:/"):
        from flows.tracking import download_model

        stem = download_model(model)
    else:
        stem = Path(model)
        if stem.suffix in (".safetensors", ".json"):
            stem = stem.with_suffix("")
    if not stem.with_suffix(".json").is_file():
        raise ModelError(f"--model: {stem.with_suffix('.json')} not found")
    dev = pick_device()
    net, card = load_model(stem, dev)
    times = None
    if schedule == "bellman":  # models/NAME.schedule.json beside the weights; ModelError names it
        from rectflow.schedule import schedule_times

        times = schedule_times(stem, steps, card.get("meta", {}).get("sha256"))
    shape = tuple(card["arch"]["shape"])
    z0 = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.inference_mode():
        sol = solve(net, z0, solver, steps, times=times)
    x = sol.x.float().cpu().numpy().reshape(n, -1)
    grid = "adaptive" if solver == "rk45" else schedule
    meta = {"model": model, "shape": list(shape), "solver": solver, "schedule": grid, "nfe": sol.nfe, "seed": seed}
    if times is not None:
        meta["times"] = [float(t) for t in times.tolist()]
    table = pa.table({f"d{i}": x[:, i] for i in range(x.shape[1])})
    table = table.replace_schema_metadata({"rectflow": json.dumps(meta)})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    print(json.dumps({"out": str(out), "n": n, "shape": list(shape), "solver": solver, "schedule": grid, "nfe": sol.nfe}))


@app.command()
def serve(params: ParamsOpt = Path("params.yaml")) -> None:
    """Serve the deployment rectflow-pipeline/nightly with its cron schedule (needs a Prefect server)."""
    from rectflow.config import load_params

    p = _guard(load_params, params, [])
    from flows.deploy import serve as _serve

    _serve(p, params)


def main() -> None:
    """Entry point: exit 0 on success, 2 with one line on bad input, 1 on a failed run."""
    try:
        rc = app(standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:
        # usage errors (click's, or the copy typer vendors): unknown option, bad value, missing argument
        if hasattr(e, "format_message") and type(e).__name__ in ("UsageError", "BadParameter", "NoSuchOption",
                                                                  "MissingParameter", "BadOptionUsage", "BadArgumentUsage"):
            print(f"rectflow: error: {' '.join(e.format_message().split())}", file=sys.stderr, flush=True)
            sys.exit(2)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


def entry() -> None:
    """The ``rectflow`` executable: :func:`main`, then a fast exit.

    Once the command is done, every ``atexit`` handler runs (logging flushed, Prefect's temporary
    server stopped, MLflow runs ended), non-daemon threads are joined and the output streams
    flushed, then the process ends with ``os._exit``. That skips only the interpreter's teardown of
    its modules (torch, MLflow, Prefect, DVC, SQLAlchemy): 1–3 s of freeing memory on a 2-core
    CPU, paid by every stage process and every ``rectflow run``. (:func:`main` itself exits
    normally, for callers in the same process.)
    """
    import atexit
    import threading

    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
