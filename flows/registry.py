"""Model registry: one registered model per *task*, and ``champion`` moves only on merit within a task.

A task is what the one-step model maps from and to (:func:`task_spec`): the source π0, the target π1
and the data shape. Its registered name is ``tracking.registered_model`` when that is set, else one
derived from the task (:func:`registered_name`, e.g. ``rectflow-onestep-gaussian-to-moons-2-1a2b3c4d5e``),
so two tasks never share a champion. Every registered version carries the tags ``rectflow.task_key``
(:func:`task_key`) and ``rectflow.task`` (the spec as JSON).

A new version takes the alias ``champion`` only when its figure at its own step count beats the
current champion's *re-measured on this run's data and noise seeds* (so the comparison is always
like for like); otherwise it gets ``challenger``. The figure (:func:`task_metric`) is the Fréchet
distance ``fd`` for image tasks (shape ``(c, h, w)``) and ``w2`` for vector tasks; lower is better
for both. A champion of the same name that belongs to another task (a name forced for two tasks,
or a registry from before task keys) is never compared with and never touched: the new version
becomes ``challenger``. A model whose weights equal the champion's (an unchanged rerun) is not
registered again.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from rectflow.config import BUILTIN_2D, Params
from rectflow.layout import Layout
from rectflow.nets import read_model_card
from rectflow.stages import last_flow

__all__ = ["TASK_KEY_TAG", "TASK_TAG", "promote", "registered_name", "score_model", "task_key", "task_metric", "task_spec"]

TASK_KEY_TAG = "rectflow.task_key"
TASK_TAG = "rectflow.task"
NAME_PREFIX = "rectflow-onestep"


# ---- what a task is -------------------------------------------------------------------------------


def _side_spec(kind: str, path: str | None, noise: float | None, root: Path) -> dict[str, Any]:
    if kind == "gaussian":  # N(0, I) of the data shape: nothing else to say
        return {"kind": "gaussian"}
    if kind in BUILTIN_2D:
        return {"kind": kind, "noise": noise}
    if kind == "file":
        assert path is not None  # DataParams requires it
        if "://" in path:  # s3://BUCKET/PREFIX names itself
            return {"kind": "file", "path": path}
        f = Path(path).expanduser()
        return {"kind": "file", "path": str((f if f.is_absolute() else root / f).resolve())}
    return {"kind": kind}  # digits: a fixed, bundled data set


def task_spec(p: Params, layout: Layout) -> dict[str, Any]:
    """What defines the task of this workspace's one-step model, as a JSON-able dict::

        {"source": {...}, "target": {...}, "shape": [d] | [c, h, w]}

    Each side is ``{"kind": "gaussian"}`` (N(0, I) of ``shape``), ``{"kind": NAME, "noise": data.noise}``
    for a built-in 2D generator (``noise`` None: the set's standard level; the noise *is* part of the
    task because it changes the distribution, so an explicit value equal to the standard level is
    still another task), ``{"kind": "digits"}``, or ``{"kind": "file", "path": ABSOLUTE PATH}`` (the
    resolved ``data.*_path``, relative paths against the workspace root). ``shape`` is the prepared
    target's per-sample shape (``data/prepared/meta.json``; the model card's ``arch.shape`` if that
    is missing).

    Not part of the task: the seed, ``n_train``/``n_test``/``test_fraction`` (how many samples are
    drawn, not from what), ``hflip`` (a training augmentation), the model and every training setting
    (those are what versions of one task differ in), and the *contents* of a file (a data set that
    grows or is cleaned is the same task; its sha256 is in the version's run, not in the task).
    """
    from rectflow.data import DataError, prepared_meta

    d = p.data
    root = layout.root.resolve()
    try:
        shape = list(prepared_meta(layout.prepared)["target"]["shape"])
    except DataError:
        shape = list(read_model_card(layout.model("distilled"))["arch"]["shape"])
    return {
        "source": _side_spec(d.source, d.source_path, d.noise, root),
        "target": _side_spec(d.target, d.target_path, d.noise, root),
        "shape": [int(s) for s in shape],
    }


def task_key(spec: dict[str, Any]) -> str:
    """10 hex characters of the sha256 of ``spec`` as canonical JSON (sorted keys, no spaces)."""
    canon = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:10]


def task_metric(spec: dict[str, Any]) -> str:
    """``fd`` for image tasks (shape ``(c, h, w)``), ``w2`` for vectors; lower is better for both."""
    return "fd" if len(spec["shape"]) == 3 else "w2"


def _label(side: dict[str, Any]) -> str:
    if side["kind"] == "file":
        p = Path(side["path"])
        return f"file-{(p.stem if p.suffix else p.name)[:40]}"
    return str(side["kind"])


def registered_name(p: Params, spec: dict[str, Any]) -> str:
    """``tracking.registered_model`` when it is set (any string, ``rectflow-onestep`` included), else
    ``rectflow-onestep-SOURCE-to-TARGET-SHAPE-KEY`` (a file side reads ``file-STEM``; SHAPE ``2`` or
    ``1x8x8``; KEY :func:`task_key`), limited to the letters, digits, ``-``, ``_`` and ``.`` that
    MLflow registered-model names allow."""
    forced = getattr(p.tracking, "registered_model", None)
    if forced is not None:
        return forced
    shape = "x".join(str(s) for s in spec["shape"])
    raw = f"{NAME_PREFIX}-{_label(spec['source'])}-to-{_label(spec['target'])}-{shape}-{task_key(spec)}"
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9_.-]+", "-", raw))


def describe_task(spec: dict[str, Any]) -> str:
    """One line for people: ``gaussian -> moons, shape (2,)``."""
    def side(s: dict[str, Any]) -> str:
        if s["kind"] == "file":
            return f"file {s['path']}"
        return s["kind"] + (f" (noise {s['noise']})" if s.get("noise") is not None else "")

    return f"{side(spec['source'])} -> {side(spec['target'])}, shape {tuple(spec['shape'])}"


# ---- figures --------------------------------------------------------------------------------------


def _alias(client, name: str, alias: str):  # type: ignore[no-untyped-def]
    """The version of ``name`` that holds ``alias``; None when the model or the alias does not exist
    (any other failure, a server that does not answer, is raised: never read as "no champion")."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:  # sqlite: INVALID_PARAMETER_VALUE for a missing alias; REST: not found
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _evaluated(layout: Layout, steps: int) -> dict[str, Any] | None:
    """The distilled model's row at its own step count as the evaluate stage measured it
    (``metrics/eval.json``, Euler on the uniform grid): the same noise, data and solver as
    :func:`score_model`."""
    try:
        rows = json.loads((layout.metrics / "eval.json").read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for r in rows:
        if (r.get("model"), r.get("solver"), r.get("schedule", "uniform"), r.get("nfe")) == ("distilled", "euler", "uniform", steps):
            return r
    return None


def _fd_available(layout: Layout) -> bool:
    from tasks.features import FEATURES

    return (layout.prepared / FEATURES).with_suffix(".safetensors").is_file()


def score_model(p: Params, layout: Layout, stem: Path, metric: str) -> float | None:
    """``metric`` (``w2`` or ``fd``) of a student model at its own step count on this workspace's
    evaluation noise and data, exactly as the evaluate stage measures it; None if the model's data
    shape differs (or, for ``fd``, the workspace has no feature net)."""
    from tasks.evaluate import score_one_step

    if metric == "w2":
        return score_one_step(p, layout, stem)
    if metric != "fd":
        raise ValueError(f"score_model: unknown metric {metric!r}; expected 'w2' or 'fd'")
    import torch

    from rectflow.data import load_prepared
    from rectflow.models import load_model
    from rectflow.solvers import solve
    from tasks._common import device
    from tasks.evaluate import eval_noise
    from tasks.features import fd_scorer

    dev = device()
    target = load_prepared(layout.prepared, "target", "test")
    model, card = load_model(stem, dev)
    if tuple(card["arch"]["shape"]) != tuple(target.shape):
        return None
    scorer = fd_scorer(p, layout, dev)
    if scorer is None:
        return None
    z0 = eval_noise(p, layout, p.evaluate.n_samples, tuple(target.shape)).to(dev)
    with torch.inference_mode():
        x = solve(model, z0, "euler", int(card["meta"].get("steps", 1))).x.float()
    return float(scorer(x, se=False)["fd"])


def _other_task(champion) -> str:  # type: ignore[no-untyped-def]
    """What the champion's tags say about its task, for the promotion record."""
    tags = champion.tags
    try:
        return f"task {tags[TASK_KEY_TAG]}: {describe_task(json.loads(tags[TASK_TAG]))}"
    except (KeyError, ValueError, TypeError):
        pass
    if TASK_KEY_TAG in tags:
        return f"task {tags[TASK_KEY_TAG]}"
    was = f"{tags['data.source']} -> {tags['data.target']}, " if "data.source" in tags and "data.target" in tags else ""
    return f"{was}registered without a {TASK_KEY_TAG} tag"


# ---- promotion ------------------------------------------------------------------------------------


class _DropLines:
    """A stderr that drops MLflow's event lines about registering (the run's summary reports the
    promotion) and passes every other line through."""

    DROP = ("Successfully registered model '", "Created version '", "Registered model '")

    def __init__(self, out: Any) -> None:
        self.out, self.buf = out, ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if not line.startswith(self.DROP):
                self.out.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.buf and not self.buf.startswith(self.DROP):
            self.out.write(self.buf)
        self.buf = ""
        self.out.flush()


def _registry_lines(verbose: bool):  # type: ignore[no-untyped-def]
    """Quiet by default: MLflow prints its registry events to stderr unconditionally."""
    import contextlib

    if verbose:
        return contextlib.nullcontext()
    return contextlib.redirect_stderr(_DropLines(sys.stderr))


def _version_with_sha(client, name: str, sha: str):  # type: ignore[no-untyped-def]
    """The latest version of registered model ``name`` whose weights' sha256 tag is ``sha``, or None."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001 - no such model yet
        return None
    same = [v for v in versions if v.tags.get("sha256") == sha]
    return max(same, key=lambda v: int(v.version)) if same else None


def fetch_champion_flow(tracker, root: Path, for_version: str) -> str | None:  # type: ignore[no-untyped-def]
    """Put the flow (rf1) of this task's champion into ``.rectflow/warm`` for data version
    ``for_version``, for a fine-tuning pretrain (``schedule.on_new_data: finetune``): the weights and
    card its pretrain run logged, and ``warm.json``. Returns ``"NAME vN"``, or None (and
    ``.rectflow/warm`` emptied) when the task has no champion or its run logged no flow."""
    import shutil
    import tempfile

    p, client = tracker.p, tracker.client
    layout = Layout(root)
    spec = task_spec(p, layout)
    name = registered_name(p, spec)
    shutil.rmtree(layout.warm, ignore_errors=True)
    champion = _alias(client, name, "champion")
    if champion is None or champion.tags.get(TASK_KEY_TAG) != task_key(spec):
        return None
    parent = champion.tags.get("mlflow.parent_run_id") or champion.run_id
    runs = client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}' and "
                              "tags.`rectflow.stage` = 'pretrain'", max_results=1)
    if not runs:
        return None
    layout.state.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=layout.state, prefix=".warm-") as tmp:
        try:
            got = Path(client.download_artifacts(runs[0].info.run_id, "models/rf1", tmp))
        except Exception:  # noqa: BLE001 - the run logged no flow (tracking was partial)
            return None
        if not (got / "rf1.safetensors").is_file() or not (got / "rf1.json").is_file():
            return None
        label = f"{name} v{champion.version}"
        (got / "warm.json").write_text(json.dumps({"for_version": for_version, "champion": label}))
        got.rename(layout.warm)
    return label


def log_onestep(stem: Path, flow: Path | None, name: str | None = None):  # type: ignore[no-untyped-def]
    """Log ``stem`` (a student) as the MLflow pyfunc ``onestep`` of the active run (registered as
    ``name`` if given), with the flow ``flow`` beside it so that the model can invert too
    (``flows/onestep_model.py``); its signature declares the params. Returns MLflow's model info."""
    import warnings

    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from flows.onestep_model import PARAMS

    artifacts = {"weights": str(stem.with_suffix(".safetensors")), "card": str(stem.with_suffix(".json"))}
    if flow is not None and flow.with_suffix(".safetensors").is_file():
        artifacts |= {"flow_weights": str(flow.with_suffix(".safetensors")), "flow_card": str(flow.with_suffix(".json"))}
    kinds = {int: "long", float: "double", str: "string"}
    params = ParamSchema([ParamSpec(k, kinds[type(v)], v) for k, v in PARAMS.items()])
    with warnings.catch_warnings():  # its input is an (n, *shape) array the card describes: no example needed
        warnings.filterwarnings("ignore", message=".*input example.*", category=UserWarning)
        return mlflow.pyfunc.log_model(
            name="onestep", python_model=str(Path(__file__).with_name("onestep_model.py")), artifacts=artifacts,
            signature=ModelSignature(params=params), pip_requirements=["rectflow"], registered_model_name=name,
        )


def promote(tracker, root: Path, parent_run_id: str, verbose: bool = False) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Register ``models/distilled`` under its task's name and move ``champion`` only on merit.

    Returns the promotion record: ``decision`` (``champion`` | ``challenger`` | ``unchanged``),
    ``version``, ``registered_model``, ``task_key``, ``metric`` (``fd`` | ``w2``), ``score`` (and the
    same value under the metric's name), ``previous_score`` / ``previous_<metric>`` when compared
    with a champion, and ``detail``.
    """
    import mlflow

    from flows.tracking import download_model

    p, client = tracker.p, tracker.client
    layout = Layout(root)
    spec = task_spec(p, layout)
    key = task_key(spec)
    name = registered_name(p, spec)
    metric = task_metric(spec)
    if metric == "fd" and not _fd_available(layout):
        print(f"rectflow: warning: registry: no feature net under {layout.prepared} for the Fréchet distance; "
              "promoting this image task on W2", file=sys.stderr, flush=True)
        metric = "w2"
    stem = layout.model("distilled")
    card = read_model_card(stem)
    sha = card["meta"]["sha256"]
    row = _evaluated(layout, int(card["meta"].get("steps", 1))) or {}
    score = float(row[metric]) if row.get(metric) is not None else score_model(p, layout, stem, metric)
    if score is None:
        raise ValueError(f"registry: cannot measure {metric} of {stem} on this workspace's data")
    base = {"registered_model": name, "task_key": key, "metric": metric}

    def record(decision: str, version: Any, detail: str, previous: float | None = None) -> dict[str, Any]:
        out = base | {"decision": decision, "version": str(version), "score": score, metric: score, "detail": detail}
        if previous is not None:
            out |= {"previous_score": previous, f"previous_{metric}": previous}
        return out

    champion = _alias(client, name, "champion")
    if champion is not None and champion.tags.get("sha256") == sha:
        return record("unchanged", champion.version, f"weights equal champion v{champion.version}")
    same = _version_with_sha(client, name, sha)
    if same is not None:  # registered before and not promoted then: the same model is the same challenger
        prev = champion.tags.get(metric) if champion is not None else None
        return record("challenger", same.version, f"weights equal v{same.version}, registered before; not "
                      f"registered again (champion v{champion.version if champion else '–'} kept)",
                      float(prev) if prev is not None else None)
    mlflow.set_tracking_uri(tracker.uri)
    import warnings

    with mlflow.start_run(run_id=parent_run_id), warnings.catch_warnings(), _registry_lines(verbose):
        # the model's input is an (n, *shape) array whose shape the card holds; MLflow's advice to add
        # type hints for a signature does not apply, and would print on every run
        warnings.filterwarnings("ignore", message=".*type hints.*", category=UserWarning)
        info = log_onestep(stem, layout.model(last_flow(p)), name)
    version = str(info.registered_model_version)
    tags = {"sha256": sha, metric: f"{score:.6f}", "rectflow.metric": metric, TASK_KEY_TAG: key,
            TASK_TAG: json.dumps(spec, sort_keys=True), "seed": str(p.seed), "data.target": p.data.target,
            "data.source": p.data.source, "mlflow.parent_run_id": parent_run_id}
    if metric != "w2" and row.get("w2") is not None:
        tags["w2"] = f"{float(row['w2']):.6f}"
    if row.get("fd_net_sha256"):
        tags["fd_net_sha256"] = str(row["fd_net_sha256"])
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if getattr(p.tracking, "registered_model", None) is None:  # a derived name is this task's alone
        client.set_registered_model_tag(name, TASK_KEY_TAG, key)
        client.set_registered_model_tag(name, TASK_TAG, json.dumps(spec, sort_keys=True))
    if champion is None:
        client.set_registered_model_alias(name, "champion", version)
        return record("champion", version, "first version")
    if champion.tags.get(TASK_KEY_TAG) != key:  # never compared with, never touched
        client.set_registered_model_alias(name, "challenger", version)
        return record("challenger", version, f"champion v{champion.version} is another task ({_other_task(champion)}); "
                      "not compared, kept")
    champ_stem = download_model(f"models:/{name}/{champion.version}", tracker.uri)
    champ_score = score_model(p, layout, champ_stem, metric)
    label = metric.upper()
    if champ_score is not None and score < champ_score:
        client.set_registered_model_alias(name, "champion", version)
        return record("champion", version, f"{label} {score:.4f} < champion v{champion.version}'s {champ_score:.4f} "
                      "on the same data and seeds", champ_score)
    client.set_registered_model_alias(name, "challenger", version)
    why = "not comparable (other data shape)" if champ_score is None else f"{label} {champ_score:.4f} ≤ {score:.4f}"
    return record("challenger", version, f"champion v{champion.version} kept: {why}", champ_score)
