"""MLflow tracking for pipeline runs: one parent run per pipeline run, one child run per stage.

Runs are created and written through ``MlflowClient`` with explicit run ids (never the fluent
"active run", which is per thread, and Prefect tasks may run in threads). The default store is
``sqlite:///mlflow.db``; any tracking URI works by setting. A server that does not answer is probed
once with a short timeout: ``tracking.on_unreachable: fallback`` logs to the local sqlite store
instead and says so; ``fail`` stops with a clear error. Nothing here ever logs a secret: params
hold none (:mod:`rectflow.secrets`), credentials of ``MLFLOW_TRACKING_URI`` reach MLflow through
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (:func:`rectflow.secrets.split_environment`),
and every param, tag and message goes through :func:`rectflow.secrets.redact_text`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rectflow.config import Params, ParamsError
from rectflow.layout import Layout
from rectflow.secrets import SplitError, redact_text, redact_url, split_environment

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

LOCAL_URI = "sqlite:///mlflow.db"
MODEL_STAGES = {"pretrain": ["rf1"], "distill": ["distilled"]}  # quantize: the variants its record names
SECRET_HINTS = ("secret", "password", "token", "access_key", "credential")


class TrackingUnavailable(ParamsError):
    """The configured MLflow server does not answer and ``on_unreachable`` is ``fail``."""


def _reachable(uri: str, timeout: float = 3.0) -> bool:
    """Whether an http(s) server answers at ``uri`` (any answer below 500 counts: a server behind
    an authenticating proxy may refuse the anonymous probe)."""
    import urllib.error

    if not uri.startswith(("http://", "https://")):
        return True
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            return r.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except Exception:
        return False


def resolve_uri(p: Params) -> tuple[str, str | None]:
    """(URI to use, a warning if we fell back). Env ``MLFLOW_TRACKING_URI`` overrides params.

    Credentials in ``MLFLOW_TRACKING_URI`` were moved into MLflow's own variables first
    (:func:`rectflow.secrets.split_environment`; the ``rectflow`` command already did): the URI used,
    shown and logged is the bare one."""
    try:
        split_environment()
    except SplitError as e:
        raise ParamsError(str(e)) from None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or p.tracking.mlflow_uri
    if _reachable(uri):
        return uri, None
    shown = redact_url(uri)
    if p.tracking.on_unreachable == "fail":
        raise TrackingUnavailable(f"tracking.mlflow_uri: MLflow server {shown} does not answer")
    return LOCAL_URI, f"MLflow server {shown} does not answer; logging to {LOCAL_URI} instead"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out |= flatten(v, f"{prefix}{k}." if not isinstance(v, dict) or v else f"{prefix}{k}")
        return {k.rstrip("."): v for k, v in out.items()}
    out[prefix] = d
    return out


def _safe(key: str) -> bool:
    return not any(h in key.lower() for h in SECRET_HINTS)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def dvc_lock_hashes(root: Path, stage: str) -> dict[str, str]:
    """``dvc.lock`` md5 of the stage's outputs (data sets, pairs, models), as tags."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    import yaml

    doc = yaml.safe_load(lock.read_text()) or {}
    outs = (doc.get("stages", {}).get(stage) or {}).get("outs", [])
    return {f"dvc.out.{o['path']}": o.get("md5", "") for o in outs if "md5" in o}


class Tracker:
    """The MLflow side of one pipeline run."""

    def __init__(self, p: Params, root: Path) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.p, self.root = p, root
        self.uri, self.warning = resolve_uri(p)
        if self.warning:
            print(f"rectflow: warning: {redact_text(self.warning)}", file=sys.stderr, flush=True)
        if self.uri.startswith("sqlite:///") and not self.uri.startswith("sqlite:////"):
            self.uri = f"sqlite:///{(root / self.uri[len('sqlite:///'):]).resolve()}"
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        exp = self.client.get_experiment_by_name(p.tracking.experiment)
        if exp is None:
            art = (root / "mlruns").resolve().as_uri() if not self.uri.startswith("http") else None
            self.experiment_id = self.client.create_experiment(p.tracking.experiment, artifact_location=art)
        else:
            self.experiment_id = exp.experiment_id

    # -- runs -----------------------------------------------------------------------------------

    def workspace_tag(self) -> str:
        """``HOST:/abs/workspace``: which workspace a run belongs to (its workspace lock is per host)."""
        import socket

        return f"{socket.gethostname()}:{self.root.resolve()}"

    def end_orphans(self) -> list[str]:
        """Mark KILLED the runs of this workspace left RUNNING by a run that was killed (``kill -9``,
        a power cut). Called under the workspace lock, so no live run of this workspace exists."""
        ws = self.workspace_tag().replace("'", "\\'")
        try:
            runs = self.client.search_runs([self.experiment_id], f"tags.`rectflow.workspace` = '{ws}' "
                                           "and attributes.status = 'RUNNING'", max_results=1000)
        except Exception:  # a registry that cannot search by tag: leave them as they are
            return []
        for run in runs:
            self.client.set_tag(run.info.run_id, "rectflow.ended", "KILLED by the next run: its process was gone")
            self.client.set_terminated(run.info.run_id, "KILLED")
        return [run.info.run_id for run in runs]

    def start_parent(self, tags: dict[str, str], overrides: list[str]) -> str:
        from mlflow.entities import Param

        orphans = self.end_orphans()
        if orphans:
            print(f"[rectflow] MLflow: {len(orphans)} run(s) of an interrupted run marked KILLED", file=sys.stderr,
                  flush=True)
        tags = {k: redact_text(str(v)) for k, v in tags.items()} | {"rectflow.workspace": self.workspace_tag()}
        run = self.client.create_run(self.experiment_id, run_name=tags.get("rectflow.run_name", "pipeline"), tags=tags)
        params = {k: v for k, v in flatten(self.p.model_dump(mode="json")).items() if _safe(k)}
        self._log_params(run.info.run_id, params)
        resolved = self.root / "params.resolved.yaml"
        if resolved.is_file():  # the document the stages run with, as DVC tracks it (params hold no secret)
            self.client.log_artifact(run.info.run_id, str(resolved))
        if overrides:
            self.client.log_batch(run.info.run_id, params=[Param("overrides", redact_text("; ".join(overrides))[:6000])])
        return run.info.run_id

    def start_child(self, parent_id: str, stage: str, keys: tuple[str, ...], tags: dict[str, str]) -> str:
        """A stage's run, with the resolved params it reads (``keys``: its registry entry's params)
        logged exactly as ``params.resolved.yaml`` has them."""
        tags = {k: redact_text(str(v)) for k, v in tags.items()}
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={"mlflow.parentRunId": parent_id, "rectflow.stage": stage, "rectflow.workspace": self.workspace_tag()}
            | tags,
        )
        flat = flatten(self.p.model_dump(mode="json"))
        wanted = {k: v for k, v in flat.items() if any(k == key or k.startswith(f"{key}.") for key in keys)}
        self._log_params(run.info.run_id, {k: v for k, v in wanted.items() if _safe(k)})
        return run.info.run_id

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def run_url(self, run_id: str) -> str:
        base = redact_url(self.uri) if self.uri.startswith("http") else "http://127.0.0.1:5000 (mlflow ui --backend-store-uri sqlite:///mlflow.db)"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}"

    # -- what a stage logs ----------------------------------------------------------------------

    def log_stage(self, run_id: str, stage: str, record: dict[str, Any], executed: bool) -> None:
        from mlflow.entities import Metric

        layout = Layout(self.root)
        now = int(time.time() * 1000)
        self.client.set_tag(run_id, "rectflow.skipped", str(not executed).lower())
        for k, v in dvc_lock_hashes(self.root, stage).items():
            self.client.set_tag(run_id, k, v)
        numeric = {k: float(v) for k, v in flatten(record).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics = [Metric(_key(k), v, now, 0) for k, v in numeric.items()]
        for name in _trained_models(stage, record):
            hist = layout.history(name)
            if hist.is_file():
                with open(hist) as f:
                    for row in csv.DictReader(f):
                        step = int(row["step"])
                        metrics += [Metric(f"train/{name}/loss", float(row["loss"]), now, step),
                                    Metric(f"train/{name}/samples_per_s", float(row["samples_per_s"]), now, step)]
                        if row.get("d_loss"):  # distillation with the adversarial term
                            metrics.append(Metric(f"train/{name}/d_loss", float(row["d_loss"]), now, step))
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])
        if layout.stage_metrics(stage).is_file():
            self.client.log_artifact(run_id, str(layout.stage_metrics(stage)), "metrics")
        from rectflow.schedule import schedule_path

        for name in MODEL_STAGES.get(stage, []) + (_reflow_models(record) if stage == "reflow" else []) + (
                [m["model"] for m in record.get("models", [])] if stage == "quantize" else []):
            # weights, card and (flows) the BOSS step schedules: `rectflow sample --schedule bellman`
            # finds NAME.schedule.json beside the weights it downloads
            for path in (*(layout.model(name).with_suffix(s) for s in (".safetensors", ".json")),
                         schedule_path(layout.model(name))):
                if path.is_file():
                    self.client.log_artifact(run_id, str(path), f"models/{name}")
        if stage in ("couple", "reflow"):
            for man in sorted(layout.couplings.glob("round-*/manifest.json")):
                self.client.log_artifact(run_id, str(man), f"couplings/{man.parent.name}")
        if stage == "evaluate":
            rows = json.loads((layout.metrics / "eval.json").read_text())["rows"]
            for r in rows:  # a BOSS-schedule row: eval/MODEL/SOLVER-bellman/nfeK (never the uniform row's key)
                tag = "-bellman" if r.get("schedule") == "bellman" else ""
                key = f"{r['model']}/{r['solver']}{tag}/nfe{r['nfe']}"
                ms = [Metric(f"eval/{key}/{m}", float(r[m]), now, int(r["nfe"]))
                      for m in ("w2", "mmd", "transport_cost", "latency_ms", "latency_b1_ms", "fd", "accuracy")
                      if r.get(m) is not None]
                self.client.log_batch(run_id, metrics=ms)
            self.client.log_artifact(run_id, str(layout.metrics / "eval.json"), "metrics")
            for plot in sorted(layout.plots.glob("*")):
                if plot.is_file():
                    self.client.log_artifact(run_id, str(plot), "plots")
            for sub in ("samples", "classes"):  # sample grids; a conditional run's one-row-per-class grids
                if (layout.plots / sub).is_dir():
                    self.client.log_artifacts(run_id, str(layout.plots / sub), f"plots/{sub}")

    def log_summary(self, run_id: str, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(_key(k), float(v), now, 0) for k, v in summary.items() if isinstance(v, (int, float))]
        if ms:
            self.client.log_batch(run_id, metrics=ms)

    def log_data(self, run_id: str, status: dict[str, Any]) -> None:
        """The run's data: each user data set as an MLflow dataset input (name ``data.SIDE``, digest the
        first 32 hex digits of its content version, source its path), and the one-line status
        (``rectflow.data``: new data since version X, or none) as a tag."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for side, v in status.get("sides", {}).items():
            remote = "://" in v["path"]
            source = json.dumps({"uri": redact_text(v["path"] if remote else str(Path(v["path"]).resolve()))})
            inputs.append(DatasetInput(Dataset(f"data.{side}", v["version"][:32], "s3" if remote else "local", source),
                                       [InputTag("mlflow.data.context", "training")]))
            self.client.set_tag(run_id, f"rectflow.data.{side}.version", v["version"])
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)
        self.client.set_tag(run_id, "rectflow.data", redact_text(status["line"])[:5000])

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact_text(json.dumps(v) if isinstance(v, (list, dict)) else str(v))) for k, v in params.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])


def _key(k: str) -> str:
    return k.replace(".", "/").replace(" ", "_")


def _trained_models(stage: str, record: dict[str, Any]) -> list[str]:
    if stage == "pretrain":
        return ["rf1"]
    if stage == "reflow":
        return _reflow_models(record)
    if stage == "distill":
        return [s["model"] for s in record.get("students", [])]
    return []


def _reflow_models(record: dict[str, Any]) -> list[str]:
    return [r["train"]["model"] for r in record.get("rounds", [])]


def download_model(uri: str, tracking_uri: str | None = None) -> Path:
    """Fetch a registered model (``models:/NAME@ALIAS``) and return the stem of its weights."""
    import mlflow

    from rectflow.nets import ModelError

    try:
        split_environment()
    except SplitError as e:
        raise ParamsError(str(e)) from None
    mlflow.set_tracking_uri(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", LOCAL_URI))
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri))
    except Exception as e:
        raise ModelError(redact_text(f"--model: cannot fetch {uri} from MLflow ({str(e).splitlines()[0][:200]})")) from None
    found = _logged_weights(local) or sorted(local.rglob("*.safetensors"))
    if not found:
        raise ModelError(f"--model: {uri} holds no .safetensors weights")
    return found[0].with_suffix("")


def _logged_weights(local: Path) -> list[Path]:
    """The ``weights`` artifact a pyfunc's MLmodel names (the student, not the flow logged beside
    it), as a one-element list; empty when there is no such MLmodel (a run's model folder)."""
    import yaml

    for mlmodel in local.rglob("MLmodel"):
        try:
            doc = yaml.safe_load(mlmodel.read_text())
            rel = doc["flavors"]["python_function"]["artifacts"]["weights"]["path"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            continue
        if (mlmodel.parent / rel).is_file():
            return [mlmodel.parent / rel]
    return []
