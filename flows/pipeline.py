"""The Prefect flow ``rectflow-pipeline``: the seven stages as Prefect tasks, wired through DVC.

One DAG, two entry points. Each task reproduces its stage with DVC (``dvc repro --single-item``),
so a stage whose code, params and inputs are unchanged is skipped by ``rectflow run`` exactly as by
``dvc repro``, and after either the other has nothing left to do. Parameters arrive as one typed
pydantic model (:class:`rectflow.config.Params`: a nested model per stage, with descriptions,
bounds and ``Literal`` choices), which the Prefect UI renders as a validated form; values that
differ from ``params.yaml`` are written into it (comments kept), the way ``dvc exp run -S`` records
them, and logged as the MLflow parent run's ``overrides``.

Tasks pass small records (stage name, whether it ran, MLflow run id, a few figures), never tensors.
"""


import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from rectflow.config import Params, ParamsError, dump_params, load_params, read_yaml, validate
from rectflow.io import atomic_write_bytes
from rectflow.layout import Layout
from tasks import STAGES

PARAMS_FILE = "params.yaml"


def _defaults() -> Params:
    """The UI form's defaults: ``params.yaml`` of the working directory, else the schema defaults."""
    try:
        return load_params(PARAMS_FILE) if Path(PARAMS_FILE).is_file() else Params()
    except ParamsError:
        return Params()


# ---- params.yaml: record overrides like `dvc exp run -S` ------------------------------------------


def record_overrides(path: Path, p: Params) -> list[str]:
    """Write the values of ``p`` that differ from ``path`` into it (comments kept); return them as KEY=VALUE."""
    from io import StringIO

    from ruamel.yaml import YAML

    from flows.tracking import flatten

    current = validate(read_yaml(path), str(path)) if path.is_file() else Params()
    new, old = flatten(dump_params(p)), flatten(dump_params(current))
    changed = [k for k in new if new[k] != old.get(k)]
    if not changed:
        return []
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(path.read_text()) if path.is_file() else {}
    doc = doc if doc is not None else {}
    for key in changed:
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = new[key]
    buf = StringIO()
    yaml.dump(doc, buf)
    atomic_write_bytes(path, buf.getvalue().encode())
    return [f"{k}={json.dumps(new[k])}" for k in changed]


# ---- one stage ------------------------------------------------------------------------------------


def dvc_repro(root: Path, stage: str) -> bool:
    """``dvc repro --single-item STAGE``; True if DVC ran the stage, False if it was up to date.

    DVC decides whether the stage runs, restores it from its run cache where it can, removes the
    stale outputs, and afterwards hashes, caches and locks the outputs, exactly as ``dvc repro``.
    Only the command itself is run differently: ``rectflow stage NAME`` runs in this process
    (:func:`stages_in_process`), which already has torch and the package imported.
    """
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo, stages_in_process():
            ran = repo.reproduce(stage, single_item=True)
    except ReproductionError as e:
        from rectflow.cli import StageFailedError, _user_errors
        from rectflow.train import NonFiniteLossError

        cause = e.__cause__
        if isinstance(cause, (*_user_errors(), NonFiniteLossError, StageFailedError)):
            raise cause from None  # the stage's own one-line error, not DVC's wrapper
        raise
    return bool(ran)


IN_PROCESS_ENV = "RECTFLOW_STAGES_IN_PROCESS"


def _in_process_stage(stage: Any) -> str | None:
    """The rectflow stage NAME that DVC's ``stage`` would run, if it may run in this process.

    Only a command that is exactly ``rectflow stage NAME`` qualifies (a user who edits the command
    in dvc.yaml gets it run as written). Couplings on Dask keep their own process: the round is a
    Prefect flow of its own, with its own cluster.
    """
    from tasks import STAGES

    if os.environ.get(IN_PROCESS_ENV, "1").strip().lower() in ("0", "false", "no"):
        return None
    cmd = stage.cmd if isinstance(stage.cmd, str) else (stage.cmd[0] if len(stage.cmd) == 1 else "")
    parts = cmd.split()
    if len(parts) != 3 or parts[:2] != ["rectflow", "stage"] or parts[2] not in STAGES:
        return None
    name = parts[2]
    if name in ("couple", "reflow"):
        from rectflow.config import load_params

        from tasks.couple import uses_dask

        if uses_dask(load_params(Path(stage.wdir) / PARAMS_FILE).couple):
            return None
    return name


@contextlib.contextmanager
def stages_in_process() -> Iterator[None]:
    """While active, DVC runs a stage command ``rectflow stage NAME`` as a call of
    :func:`rectflow.cli.run_stage` in this process instead of a new shell and interpreter.

    The same function the command calls, on the same ``params.yaml`` and working directory, so
    outputs, ``metrics/NAME.json`` and the lock entries are the same; what is saved is a new
    process per stage (interpreter, torch and package imports: about 2 s each on a 2-core CPU).
    Any other command (edited in dvc.yaml, a Dask couple) goes to DVC's own runner. Set
    ``RECTFLOW_STAGES_IN_PROCESS=0`` to run every stage in its own process.
    """
    import dvc.stage.run as dvc_stage_run

    original = dvc_stage_run.cmd_run

    def cmd_run(stage: Any, dry: bool = False, run_env: Any = None) -> None:
        name = None if dry else _in_process_stage(stage)
        if name is None:
            return original(stage, dry=dry, run_env=run_env)
        from rectflow.cli import run_stage

        print(f"Running stage '{name}' in process: rectflow stage {name}", file=sys.stderr, flush=True)
        wdir = Path(stage.wdir)
        record = run_stage(name, wdir / PARAMS_FILE, [], root=wdir)
        print(json.dumps({k: v for k, v in record.items() if not isinstance(v, (dict, list))}), flush=True)

    dvc_stage_run.cmd_run = cmd_run
    try:
        yield
    finally:
        dvc_stage_run.cmd_run = original


def _not_user_error(task, task_run, state) -> bool:  # type: ignore[no-untyped-def]
    """Retry transient failures only: a bad input or a NaN loss will fail again the same way."""
    from rectflow.cli import _user_errors
    from rectflow.train import NonFiniteLossError

    try:
        state.result()
    except (*_user_errors(), NonFiniteLossError):
        return False
    except Exception as e:
        text = str(e)
        return not any(s in text for s in ("rectflow: error", "ParamsError", "DataError", "ManifestError", "NaN"))
    return True


@task(name="stage", retries=1, retry_delay_seconds=5, retry_condition_fn=_not_user_error, task_run_name="{stage}")
def stage_task(stage: str, root: str, parent_run_id: str | None, tracker_cfg: dict[str, Any]) -> dict[str, Any]:
    logger = get_run_logger()
    rootp = Path(root)
    tracker = _tracker(tracker_cfg)
    child = tracker.start_child(parent_run_id, stage, {"prefect.flow_run_id": str(flow_run.id)}) if tracker and parent_run_id else None
    try:
        executed = dvc_repro(rootp, stage)
    except BaseException:
        if tracker and child:
            tracker.end(child, "FAILED")
        raise
    record = json.loads(Layout(rootp).stage_metrics(stage).read_text())
    if tracker and child:
        tracker.log_stage(child, stage, record, executed)
        tracker.end(child)
    logger.info("%s: %s", stage, "ran" if executed else "up to date, skipped")
    scalars = {k: v for k, v in record.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    return {"stage": stage, "executed": executed, "mlflow_run_id": child, "record": scalars}


_TRACKERS: dict[str, Any] = {}


def _tracker(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    if not cfg:
        return None
    key = json.dumps(cfg, sort_keys=True)
    if key not in _TRACKERS:
        from flows.tracking import Tracker

        _TRACKERS[key] = Tracker(Params.model_validate(cfg["params"]), Path(cfg["root"]))
    return _TRACKERS[key]


@task(name="promote")
def promote_task(root: str, parent_run_id: str, tracker_cfg: dict[str, Any]) -> dict[str, Any]:
    from flows.registry import promote

    tracker = _tracker(tracker_cfg)
    return promote(tracker, Path(root), parent_run_id)


# ---- the flow -------------------------------------------------------------------------------------


@flow(name="rectflow-pipeline", log_prints=True, description="pretrain → couple → reflow → distill → quantize → evaluate")
def pipeline(params: Params = _defaults(), track: bool = True) -> dict[str, Any]:
    """Run every stage that is out of date; log to MLflow; register and promote the one-step model."""
    from rectflow.lock import workspace_lock

    root = Path.cwd().resolve()
    logger = get_run_logger()
    _venv_on_path()
    with workspace_lock(root, wait=True, timeout=float(os.environ.get("RECTFLOW_LOCK_TIMEOUT", "3600"))):
        overrides = record_overrides(root / PARAMS_FILE, params)
        if overrides:
            logger.info("params.yaml updated with overrides: %s", ", ".join(overrides))
        tracker_cfg: dict[str, Any] = {"params": dump_params(params), "root": str(root)} if track else {}
        tracker = _tracker(tracker_cfg)
        parent = None
        if tracker:
            from flows.tracking import git_commit

            parent = tracker.start_parent(
                {"git_commit": git_commit(root), "prefect.flow_run_id": str(flow_run.id),
                 "prefect.flow_run_name": str(flow_run.name), "rectflow.run_name": f"pipeline {flow_run.name}"},
                overrides,
            )
        results = []
        try:
            for stage in STAGES:
                results.append(stage_task(stage, str(root), parent, tracker_cfg))
            summary = json.loads(Layout(root).stage_metrics("evaluate").read_text())
            promotion = promote_task(str(root), parent, tracker_cfg) if tracker and parent else {}
            if tracker and parent:
                tracker.log_summary(parent, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
                tracker.end(parent)
        except BaseException:
            if tracker and parent:
                tracker.end(parent, "FAILED")
            raise
        executed = [r["stage"] for r in results if r["executed"]]
        _artifact(root, tracker, parent, executed, promotion)
        return {"executed": executed, "skipped": [r["stage"] for r in results if not r["executed"]],
                "mlflow_parent_run_id": parent, "promotion": promotion, "overrides": overrides}


def _venv_on_path() -> None:
    """DVC runs `rectflow stage …` through the shell: make this interpreter's scripts reachable."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _artifact(root: Path, tracker, parent: str | None, executed: list[str], promotion: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    rows = json.loads((Layout(root).metrics / "eval.json").read_text())["rows"]
    head = ("| model | solver | schedule | NFE | W2 | MMD | straightness | transport cost | latency ms/sample | FD |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    body = "".join(
        f"| {r['model']} | {r['solver']} | {r.get('schedule', 'uniform')} | {r['nfe']} | {fmt(r['w2'])} "
        f"| {fmt(r['mmd'])} | {fmt(r['straightness'])} "
        f"| {fmt(r['transport_cost'])} | {fmt(r['latency_ms'])} | {fmt(r.get('fd'))} |\n"
        for r in rows
    )
    mlflow_line = f"MLflow run: {tracker.run_url(parent)}" if tracker and parent else "MLflow tracking off"
    promo = f"\n\nRegistry: {promotion.get('decision')} ({promotion.get('detail', '')})" if promotion else ""
    plots = Layout(root).plots
    grids = sorted((plots / "samples").glob("*.png")) if (plots / "samples").is_dir() else []
    grid_line = ""
    if (plots / "side_by_side.png").is_file():
        import base64

        b64 = base64.b64encode((plots / "side_by_side.png").read_bytes()).decode()
        grid_line += f"\n\n![1-RF 1 step | last RF 1 step | distilled | 1-RF 100 steps](data:image/png;base64,{b64})"
    if grids:
        grid_line += "\n\nSample grids (MLflow artifacts plots/samples/): " + ", ".join(g.name for g in grids)
    md = (f"# rectflow evaluation\n\nStages run: {', '.join(executed) or 'none (all up to date)'}\n\n{mlflow_line}"
          f"{promo}{grid_line}\n\n{head}{body}")
    create_markdown_artifact(markdown=md, key="rectflow-evaluation", description="Evaluation table of this pipeline run")


def run_cli(params_path: Path, overrides: list[str], starting: "threading.Thread | None" = None) -> dict[str, Any]:
    """``rectflow run``: validate, then run the flow in this process (ephemeral Prefect by default).

    ``starting``: the thread of :func:`flows.prefect_server.prestart`, joined before the flow runs.
    """
    p = load_params(params_path, overrides)
    if Path(params_path).resolve() != (Path.cwd() / PARAMS_FILE).resolve():
        raise ParamsError(f"--params: the pipeline runs on ./{PARAMS_FILE} (dvc.yaml reads it); got {params_path}")
    if starting is not None:  # Prefect's server is starting (flows.prefect_server): meanwhile,
        _warm_imports()       # import what the stages and the tracker need anyway
        starting.join()
    try:
        result = pipeline(params=p)
    finally:
        _drain_prefect_workers()
    print(json.dumps(result), flush=True)
    return result


def _drain_prefect_workers(timeout: float = 10.0) -> None:
    """Send the flow's last logs and events to the Prefect API now, and close their connections.

    Otherwise the events worker keeps its websocket to Prefect's temporary server open until
    exit, and the server's graceful shutdown waits for it (Prefect then kills it after 5 s).
    """
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker
    except ImportError:
        return
    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout)


def _warm_imports() -> None:
    """Import what the stages (run in this process) and the MLflow tracker need."""
    import importlib

    for module in ("torch", "dvc.repo", "mlflow", "flows.tracking", "flows.registry",
                   *(f"tasks.{stage}" for stage in STAGES)):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the stage that needs it will say so
