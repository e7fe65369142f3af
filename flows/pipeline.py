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


import json
import os
import sys
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
    """``dvc repro --single-item STAGE``; True if DVC ran the stage, False if it was up to date."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        ran = repo.reproduce(stage, single_item=True)
    return bool(ran)


def _not_user_error(task, task_run, state) -> bool:  # type: ignore[no-untyped-def]
    """Retry transient failures only: a bad input or a NaN loss will fail again the same way."""
    try:
        state.result()
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
    head = "| model | solver | NFE | W2 | MMD | straightness | transport cost | latency ms/sample | FD |\n|---|---|---|---|---|---|---|---|---|\n"
    fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    body = "".join(
        f"| {r['model']} | {r['solver']} | {r['nfe']} | {fmt(r['w2'])} | {fmt(r['mmd'])} | {fmt(r['straightness'])} "
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


def run_cli(params_path: Path, overrides: list[str]) -> dict[str, Any]:
    """``rectflow run``: validate, then run the flow in this process (ephemeral Prefect by default)."""
    p = load_params(params_path, overrides)
    if Path(params_path).resolve() != (Path.cwd() / PARAMS_FILE).resolve():
        raise ParamsError(f"--params: the pipeline runs on ./{PARAMS_FILE} (dvc.yaml reads it); got {params_path}")
    result = pipeline(params=p)
    print(json.dumps(result), flush=True)
    return result
