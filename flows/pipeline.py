"""The Prefect flow ``rectflow-pipeline``: the registry's stages as Prefect tasks, wired through DVC.

(About 420 lines on purpose: the flow, the one DVC call per stage with its status channel, and the
recording of UI-form overrides are one orchestration contract, read together.)

One DAG, two entry points. The flow iterates :data:`rectflow.stages.STAGES` (resolve, prepare …
evaluate) and reproduces each stage with DVC's own command line (``dvc repro --single-item NAME``,
which runs ``rectflow stage NAME``), so a stage whose code, params and inputs are unchanged is
skipped by ``rectflow run`` exactly as by ``dvc repro``, and after either the other has nothing left
to do. Before the stages, ``dvc.yaml`` is regenerated from the registry for the run's params
(:mod:`rectflow.dvcyaml`: ``reflow.rounds: 2`` declares rf3 and round 3).

Parameters arrive as one typed pydantic model (:class:`rectflow.config.Params`, rendered by the
Prefect UI as a validated form pre-filled with the resolved params). The keys a user changed (the
``--set`` list, or the form's values that differ from the resolution of ``params.yaml``) are
written into ``params.yaml`` (comments kept), the way ``dvc exp run -S`` records them, and logged
as the MLflow parent run's ``overrides``; the resolved document is what MLflow, the Prefect
artifact and DVC (``params.resolved.yaml``) record.

Tasks pass small records (stage name, whether it ran, MLflow run id, a few figures), never tensors.
"""


import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from rectflow.config import Params, ParamsError, dump_params
from rectflow.io import atomic_write_bytes
from rectflow.layout import Layout
from rectflow.params import load_params, load_yaml_text, resolve
from rectflow.secrets import SplitError, install as install_redaction, redact_text, split_environment
from rectflow.stages import STAGES, stage as stage_decl

from flows.dvcfiles import LOCK_FIX, check_dvc_lock, dvc_file_refused, keep_dvc_lock, repair_dvc_lock, repair_rwlock

PARAMS_FILE = "params.yaml"


def _defaults() -> Params:
    """The UI form's defaults: the resolved ``params.yaml`` of the working directory, else the
    schema defaults."""
    try:
        return load_params(PARAMS_FILE) if Path(PARAMS_FILE).is_file() else Params()
    except ParamsError:
        return Params()


# ---- params.yaml: record overrides like `dvc exp run -S` ------------------------------------------


def _flat(p: Params) -> dict[str, Any]:
    from flows.tracking import flatten

    return flatten(dump_params(p))


def form_overrides(path: Path, p: Params) -> list[str]:
    """The ``KEY=VALUE`` list that turns ``path``'s resolution into ``p`` (a UI form's params).

    Keys the user changed only: the data and profile keys first (they choose the profile), then
    whatever still differs once those are applied, so values that a new profile brings are not
    written into ``params.yaml`` as if the user had chosen them.
    """
    def diff(a: Params, b: Params) -> list[str]:
        fa, fb = _flat(a), _flat(b)
        return [f"{k}={json.dumps(fa[k])}" for k in fa if fa[k] != fb.get(k)]

    first = [o for o in diff(p, load_params(path)) if o.startswith(("data.", "profile="))]
    return first + diff(p, load_params(path, first))


def record_overrides(path: Path, overrides: list[str]) -> list[str]:
    """Write ``overrides`` (``KEY=VALUE``) into ``params.yaml`` (comments kept) and return them."""
    from io import StringIO

    from ruamel.yaml import YAML

    from rectflow.params import parse_override

    if not overrides:
        return []
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(path.read_text()) if path.is_file() else {}
    doc = doc if doc is not None else {}
    for item in overrides:
        parts, value = parse_override(item)
        node = doc
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    buf = StringIO()
    yaml.dump(doc, buf)
    load_yaml_text(buf.getvalue(), str(path))  # never write a file the reader would refuse
    atomic_write_bytes(path, buf.getvalue().encode())
    return list(overrides)


# ---- one stage ------------------------------------------------------------------------------------


class StageInputError(ParamsError):
    """A stage refused its input (``rectflow: error: …``, exit 2): its own one line, never retried."""


_DVC_HINTS = ("To track the changes with git, run:", "git add dvc.lock", "To enable auto staging, run:",
              "dvc config core.autostage true", "Use `dvc push` to send your updates to remote storage.",
              "Data and pipelines are up to date.", "Updating lock file")


def _quiet_line(line: str) -> bool:
    """DVC's hints after every stage (git add, autostage, push): shown only with --verbose."""
    text = line.strip()
    return not text or any(text.startswith(h) or text == h for h in _DVC_HINTS)


def dvc_repro(root: Path, stage: str, verbose: bool = False) -> bool:
    """``dvc repro --single-item STAGE`` (DVC's command line); True if DVC ran the stage.

    DVC decides whether the stage runs, restores it from its run cache where it can, removes the
    stale outputs, and afterwards hashes, caches and locks the outputs, exactly as ``dvc repro``.
    Its output is passed through line by line (less DVC's git hints unless ``verbose``); a stage
    that failed on bad input (exit 2) raises :class:`StageInputError` with its one line, one that
    failed while working (exit 1: a NaN loss, diverging pairs) a :class:`RunFailedError` with its
    line (neither is retried): the stage reports its status through the file ``OUTCOME_ENV`` names,
    as DVC's own status is 1 for both. A stage that died without a word (killed, a crash) or a DVC
    failure is a StageFailedError (exit 1, retried once) naming the stage and DVC's status.
    """
    import subprocess
    import tempfile

    from rectflow.errors import RunFailedError
    from tasks.runner import OUTCOME_ENV, StageFailedError

    with tempfile.TemporaryDirectory(prefix="rectflow-outcome-") as tmp:
        outcome = Path(tmp) / "outcome.json"
        ran, returncode, errors = _dvc_repro(root, stage, verbose, {**os.environ, OUTCOME_ENV: str(outcome)})
        told = _read_outcome(outcome) if returncode != 0 else None
    if returncode != 0:
        if told is not None:
            code, line = told
            raise (StageInputError if code == 2 else RunFailedError)(line)
        if errors:  # DVC refused dvc.lock / dvc.yaml before the stage ran
            raise StageInputError(errors[-1])
        raise StageFailedError(f"stage {stage}: `dvc repro --single-item {stage}` exited with status "
                               f"{returncode} (its error is above)")
    keep_dvc_lock(root)
    return ran


def _read_outcome(path: Path) -> tuple[int, str] | None:
    """The (status, line) a failing stage wrote, or None if it wrote none (or not a valid one)."""
    try:
        doc = json.loads(path.read_text())
        code, line = int(doc["code"]), str(doc["message"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (code, line) if code in (1, 2) else None


def _dvc_repro(root: Path, stage: str, verbose: bool, env: dict[str, str]) -> tuple[bool, int, list[str]]:
    """Run DVC for one stage; (whether it ran the stage, DVC's exit status, DVC's refusals of its files)."""
    import subprocess

    cmd = [str(Path(sys.executable).with_name("dvc")), "repro", "--single-item", stage]
    if not Path(cmd[0]).is_file():
        cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    from rectflow.guard import guarded

    torn = repair_rwlock(root)  # a kill while DVC rewrote its table of stage locks: DVC refuses every stage
    if torn:
        sys.stderr.write(f"[rectflow] {torn}\n")
    # under the guard: DVC, the stage and whatever it starts end with this process, even on kill -9
    proc = subprocess.Popen(guarded(cmd), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, bufsize=1, env=env)
    ran, errors = False, []
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            if line.startswith(("Running stage ", f"Stage '{stage}' is cached")):
                ran = ran or line.startswith("Running stage ")
            if dvc_file_refused(line):  # DVC cannot read dvc.lock / dvc.yaml: bad input, not transient
                errors.append(f"{dvc_file_refused(line)}: DVC cannot read it ({' '.join(line.split())[:200]}); "
                              + (LOCK_FIX if dvc_file_refused(line) == "dvc.lock" else
                                 "regenerate it with `rectflow dvc-yaml`"))
            if verbose or not _quiet_line(line):
                sys.stderr.write(line)
                sys.stderr.flush()
    return ran, proc.returncode, errors


def _not_user_error(task, task_run, state) -> bool:  # type: ignore[no-untyped-def]
    """Retry transient failures only: a bad input or a NaN loss will fail again the same way."""
    from rectflow.errors import RunFailedError
    from tasks.runner import user_errors

    try:
        state.result()
    except (*user_errors(), RunFailedError):
        return False
    except Exception as e:
        text = str(e)
        return not any(s in text for s in ("rectflow: error", "ParamsError", "DataError", "ManifestError", "NaN"))
    return True


@task(name="stage", retries=1, retry_delay_seconds=5, retry_condition_fn=_not_user_error, task_run_name="{stage}")
def stage_task(stage: str, root: str, parent_run_id: str | None, tracker_cfg: dict[str, Any],
               verbose: bool = False) -> dict[str, Any]:
    logger = get_run_logger()
    rootp = Path(root)
    tracker = _tracker(tracker_cfg)
    child = (tracker.start_child(parent_run_id, stage, stage_decl(stage).params, {"prefect.flow_run_id": str(flow_run.id)})
             if tracker and parent_run_id else None)
    try:
        executed = dvc_repro(rootp, stage, verbose)
    except BaseException:
        if tracker and child:
            tracker.end(child, "FAILED")
        raise
    record = json.loads(Layout(rootp).stage_metrics(stage).read_text())
    if tracker and child:
        tracker.log_stage(child, stage, record, executed)
        tracker.end(child)
    _say(logger, f"{stage}: {'ran' if executed else 'up to date, skipped'}")
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
def promote_task(root: str, parent_run_id: str, tracker_cfg: dict[str, Any], verbose: bool = False) -> dict[str, Any]:
    from flows.registry import promote

    tracker = _tracker(tracker_cfg)
    return promote(tracker, Path(root), parent_run_id, verbose)


# ---- the flow -------------------------------------------------------------------------------------


@flow(name="rectflow-pipeline", log_prints=True,
      description="resolve → prepare → pretrain → couple → reflow → distill → quantize → evaluate")
def pipeline(params: Params = _defaults(), track: bool = True, overrides: list[str] | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """Run every stage that is out of date; log to MLflow; register and promote the one-step model.

    ``overrides``: the ``KEY=VALUE`` list the user gave (``rectflow run --set``); None (the UI form, a
    deployment run) takes the keys of ``params`` that differ from the resolution of ``params.yaml``.
    """
    from rectflow.dvcyaml import write as write_dvc_yaml
    from rectflow.lock import workspace_lock
    from rectflow.params import write_resolved_params
    from rectflow.settings import settings

    root = Path.cwd().resolve()
    install_redaction(streams=False)  # a deployment run, not started by `rectflow`: log records at least
    try:
        split_environment()  # URL credentials into the clients' own variables (`rectflow` did it already)
    except SplitError as e:
        raise ParamsError(str(e)) from None
    logger = get_run_logger()
    _venv_on_path()
    with workspace_lock(root, wait=True, timeout=settings().lock_timeout):
        torn = repair_dvc_lock(root)  # a kill while DVC rewrote dvc.lock: the copy kept after the last stage
        if torn:
            _say(logger, torn)
        check_dvc_lock(root)  # before anything is written or tracked: DVC could not run any stage
        from rectflow.preflight import check_writable, pipeline_paths

        check_writable("rectflow run", pipeline_paths(params, root), root)
        from rectflow.stages import check_data_inputs

        check_data_inputs(params, root)
        path = root / PARAMS_FILE
        recorded = record_overrides(path, form_overrides(path, params) if overrides is None else overrides)
        if recorded:
            _say(logger, f"params.yaml updated with overrides: {', '.join(recorded)}")
        res = resolve(path)
        p = res.params
        if _flat(p) != _flat(params):
            wrong = next(k for k, v in _flat(params).items() if _flat(p).get(k) != v)
            raise ParamsError(f"{path}: resolves to other params than the run's after the overrides ({wrong})")
        _say(logger, res.note())
        _, changed = write_dvc_yaml(p, root)
        if changed:
            _say(logger, "dvc.yaml regenerated from the stage registry for these params")
        write_resolved_params(p, root)  # once per run; the resolve stage finds it current
        tracker_cfg: dict[str, Any] = {"params": dump_params(p), "root": str(root)} if track else {}
        tracker = _tracker(tracker_cfg)
        parent = None
        if tracker:
            from flows.tracking import git_commit

            parent = tracker.start_parent(
                {"git_commit": git_commit(root), "prefect.flow_run_id": str(flow_run.id),
                 "prefect.flow_run_name": str(flow_run.name), "rectflow.run_name": f"pipeline {flow_run.name}",
                 "rectflow.profile": res.profile or "none"},
                recorded,
            )
        results = []
        try:
            for stage in STAGES:
                if stage == "pretrain" and p.schedule.on_new_data == "finetune":
                    _warm_start(root, tracker, any(r["executed"] for r in results if r["stage"] == "prepare"), logger)
                results.append(stage_task(stage, str(root), parent, tracker_cfg, verbose))
            summary = json.loads(Layout(root).stage_metrics("evaluate").read_text())
            promotion = promote_task(str(root), parent, tracker_cfg, verbose) if tracker and parent else {}
            data = data_status(root, "prepare" in [r["stage"] for r in results if r["executed"]])
            if data["sides"]:
                _say(logger, data["line"])
            if tracker and parent:
                tracker.log_data(parent, data)
                tracker.log_summary(parent, {k: v for k, v in summary.items() if isinstance(v, (int, float))})
                tracker.end(parent)
        except BaseException:
            if tracker and parent:
                tracker.end(parent, "FAILED")
            raise
        executed = [r["stage"] for r in results if r["executed"]]
        _artifact(root, tracker, parent, executed, promotion, data["line"])
        return {"executed": executed, "skipped": [r["stage"] for r in results if not r["executed"]],
                "mlflow_parent_run_id": parent, "promotion": promotion, "overrides": recorded, "data": data["line"]}


def _say(logger: Any, message: str) -> None:
    """A line of the pipeline's own: in the Prefect UI's log and on stderr (also when quiet)."""
    logger.info(message)
    if logger.getEffectiveLevel() > 20:  # Prefect's console handler would not show it
        sys.stderr.write(f"[rectflow] {message}\n")
        sys.stderr.flush()


def _venv_on_path() -> None:
    """DVC runs `rectflow stage …` through the shell: make this interpreter's scripts reachable."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _warm_start(root: Path, tracker, prepared: bool, logger) -> None:  # type: ignore[no-untyped-def]
    """``schedule.on_new_data: finetune``: when prepare found a new version of the user's data, put
    the champion's flow where pretrain starts from (:func:`flows.registry.fetch_champion_flow`);
    otherwise leave what is there (pretrain only uses it for the data version it was fetched for).
    Fetched again when what is there is for another version, so a run killed while fetching (or
    before) fetches on its rerun, when prepare is no longer out of date."""
    from rectflow.data import data_version_key, prepared_meta

    status = data_status(root, prepared)
    if not any(v["previous"] and v["previous"] != v["version"] for v in status["sides"].values()):
        return
    version = data_version_key(prepared_meta(Layout(root).prepared))
    try:
        kept = json.loads((Layout(root).warm / "warm.json").read_text()).get("for_version")
    except (OSError, ValueError, AttributeError):
        kept = None
    if kept == version and (Layout(root).warm / "rf1.safetensors").is_file():
        return
    if not tracker:
        _say(logger, "schedule.on_new_data=finetune: tracking is off, so there is no champion to start from; rf1 "
             "trains from scratch")
        return
    from flows.registry import fetch_champion_flow

    label = fetch_champion_flow(tracker, root, version or "")
    _say(logger, f"new data: rf1 fine-tunes {label}'s flow" if label else
         "new data: this task has no champion with a logged flow yet; rf1 trains from scratch")


def data_status(root: Path, prepared: bool) -> dict[str, Any]:
    """What this run's data was: ``{"line": …, "sides": {side: version record}}`` for the sides read
    from the user's files (``meta.json``'s versions, prepare's record of the change). The line says
    either that new data came (its version, the previous one and how far it moved) or that there was
    none since version X, so a nightly run that ran nothing says why, never silently."""
    layout = Layout(root)
    meta = json.loads((layout.prepared / "meta.json").read_text())
    try:
        changes = json.loads(layout.stage_metrics("prepare").read_text()).get("data", {})
    except (OSError, ValueError):
        changes = {}
    sides, parts = {}, []
    for side in ("source", "target"):
        version = meta.get(side, {}).get("version")
        if not version:
            continue
        change = changes.get(side) or {}
        sides[side] = {"path": version["path"], "version": version["digest"], "files": version["files"],
                       "previous": change.get("previous"), "drift": change.get("drift")}
        short = version["digest"][:12]
        if prepared and change.get("previous") and change.get("previous") != version["digest"]:
            drift = change.get("drift") or {}
            moved = f"; W2 {drift['w2']:.4g}, MMD {drift['mmd']:.4g} from the previous version" if drift else ""
            parts.append(f"data.{side}: new data, version {short} ({version['files']} file(s)) after "
                         f"{change['previous'][:12]}{moved}")
        elif prepared:
            parts.append(f"data.{side}: version {short} ({version['files']} file(s)), prepared")
        else:
            parts.append(f"data.{side}: no new data since version {short} ({version['files']} file(s))")
    if not sides:
        kinds = ", ".join(f"{s} {meta.get(s, {}).get('kind', '?')}" for s in ("source", "target"))
        parts.append(f"data: built in ({kinds}); its params are its version")
    return {"line": "; ".join(parts), "sides": sides}


def _artifact(root: Path, tracker, parent: str | None, executed: list[str], promotion: dict[str, Any],  # type: ignore[no-untyped-def]
              data_line: str = "") -> None:
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
    student_classes = plots / "classes" / "distilled-nfe1.png"
    if student_classes.is_file():  # a conditional image run: the one-step student, one row per class
        import base64

        b64 = base64.b64encode(student_classes.read_bytes()).decode()
        grid_line += f"\n\n![one-step student, one row per class](data:image/png;base64,{b64})"
    acc = [r for r in rows if r.get("accuracy") is not None]
    if acc:
        grid_line += "\n\nLabel accuracy: " + ", ".join(
            f"{r['model']} {r['solver']} NFE {r['nfe']} (w {r.get('guidance', 1):g}): {r['accuracy']:.3f}" for r in acc)
    resolved = root / "params.resolved.yaml"
    params_md = (f"\n\n## Params (params.resolved.yaml)\n\n```yaml\n{resolved.read_text()}```\n"
                 if resolved.is_file() else "")
    md = (f"# rectflow evaluation\n\nStages run: {', '.join(executed) or 'none (all up to date)'}\n\n"
          f"Data: {data_line}\n\n{mlflow_line}"
          f"{promo}{grid_line}\n\n{head}{body}{params_md}")
    create_markdown_artifact(markdown=redact_text(md), key="rectflow-evaluation",
                             description="Evaluation table of this pipeline run")


def run_cli(params_path: Path, overrides: list[str], starting: "threading.Thread | None" = None,
            verbose: bool = False) -> dict[str, Any]:
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
        result = pipeline(params=p, overrides=list(overrides), verbose=verbose)
    finally:
        _drain_prefect_workers()
    print(redact_text(json.dumps(result)), flush=True)
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
    """Import what the MLflow tracker needs (the stages run in DVC's processes)."""
    import importlib

    for module in ("mlflow", "flows.tracking", "flows.registry"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # the stage that needs it will say so
