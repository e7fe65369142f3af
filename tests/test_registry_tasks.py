"""One registry entry per task (flows/registry.py): task identity, registered names, and promotion
that only ever compares models of the same task, on FD for images and W2 for vectors.

Real MLflow (a sqlite store in a temporary directory), real prepared data (the prepare stage, in
process, on a few hundred samples), and small untrained one-step models written as model files;
``metrics/eval.json`` is written by hand so that each test decides what the new version scores,
while the champion is always re-measured for real on the workspace's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows.registry import (
    TASK_KEY_TAG,
    TASK_TAG,
    promote,
    registered_name,
    score_model,
    task_key,
    task_metric,
    task_spec,
)
from rectflow.config import validate
from rectflow.layout import Layout
from rectflow.nets import build_model, save_model


@pytest.fixture(autouse=True)
def _no_env_tracking(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def params(store: Path | None = None, name: str | None = None, **data):  # type: ignore[no-untyped-def]
    doc = {"data": {"n_train": 400, "n_test": 200, **data}, "evaluate": {"n_samples": 200},
           "tracking": {"registered_model": name, "experiment": "registry-tasks"}}
    if store is not None:
        doc["tracking"]["mlflow_uri"] = f"sqlite:///{store}"
    return validate(doc)


def prepared(ws: Path, p) -> Layout:  # type: ignore[no-untyped-def]
    from tasks.prepare import run

    layout = Layout(ws)
    run(p, layout)
    return layout


def write_model(layout: Layout, seed: int) -> Path:
    """``models/distilled``: a small untrained MLP of the prepared data's shape, one step."""
    from rectflow.data import prepared_meta

    shape = prepared_meta(layout.prepared)["target"]["shape"]
    arch = {"kind": "mlp", "shape": list(shape), "time_embed": 8, "hidden": 16, "depth": 1}
    torch.manual_seed(seed)
    stem = layout.model("distilled")
    stem.parent.mkdir(parents=True, exist_ok=True)
    save_model(stem, build_model(arch).state_dict(), arch, {"role": "student", "steps": 1, "parent": "rf2"})
    return stem


def write_eval(layout: Layout, **figures: float) -> None:
    row = {"model": "distilled", "solver": "euler", "schedule": "uniform", "nfe": 1} | figures
    layout.metrics.mkdir(parents=True, exist_ok=True)
    (layout.metrics / "eval.json").write_text(json.dumps({"rows": [row]}))


def promote_in(ws: Path, p) -> dict:  # type: ignore[no-untyped-def]
    from flows.tracking import Tracker

    tracker = Tracker(p, ws)
    parent = tracker.start_parent({"rectflow.run_name": "test"}, [])
    out = promote(tracker, ws, parent)
    tracker.end(parent)
    return out


def client_of(store: Path):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{store}")


def snapshot(client, name: str) -> dict:  # type: ignore[no-untyped-def]
    """Everything about a registered model that promotion of another task must leave alone."""
    champ = client.get_model_version_by_alias(name, "champion")
    versions = sorted((str(v.version), sorted(v.tags.items()), sorted(v.aliases))
                      for v in client.search_model_versions(f"name='{name}'"))
    return {"champion": str(champ.version), "champion_tags": dict(champ.tags), "versions": versions}


# ---- task identity --------------------------------------------------------------------------------


def _meta(ws: Path, shape: list[int], source: str = "gaussian", target: str = "moons") -> Layout:
    layout = Layout(ws)
    layout.prepared.mkdir(parents=True, exist_ok=True)
    (layout.prepared / "meta.json").write_text(json.dumps(
        {"source": {"kind": source, "shape": shape}, "target": {"kind": target, "shape": shape}}))
    return layout


def test_task_spec_key_and_name(tmp_path: Path) -> None:
    layout = _meta(tmp_path, [2])
    spec = task_spec(params(), layout)
    assert spec == {"source": {"kind": "gaussian"}, "target": {"kind": "moons", "noise": None}, "shape": [2]}
    key = task_key(spec)
    assert len(key) == 10 and int(key, 16) >= 0
    assert task_metric(spec) == "w2"
    # how many samples, and the seed, are not the task; the noise level and the data sets are
    assert task_key(task_spec(params(n_train=999, n_test=77), layout)) == key
    assert task_key(task_spec(validate({"seed": 5}), layout)) == key
    assert task_key(task_spec(params(noise=0.05), layout)) != key
    assert task_key(task_spec(params(source="moons", target="8gaussians"), layout)) != key
    # names: derived from the task unless one is set (the old default is just a name like any other)
    derived = registered_name(params(), spec)
    assert derived == f"rectflow-onestep-gaussian-to-moons-2-{key}"
    assert registered_name(params(name="rectflow-onestep"), spec) == "rectflow-onestep"
    assert registered_name(params(name="mine"), spec) == "mine"


def test_file_task_is_its_resolved_path_not_its_contents(tmp_path: Path) -> None:
    import numpy as np

    ws = tmp_path / "ws"
    layout = _meta(ws, [1, 8, 8], target="file")
    data = ws / "my data (v1).npy"
    np.save(data, np.zeros((10, 1, 8, 8), np.float32))
    relative = params(target="file", target_path="my data (v1).npy")
    spec = task_spec(relative, layout)
    assert spec["target"] == {"kind": "file", "path": str(data.resolve())} and spec["shape"] == [1, 8, 8]
    assert task_metric(spec) == "fd"
    np.save(data, np.ones((50, 1, 8, 8), np.float32))  # the data set grew: the same task
    assert task_key(task_spec(relative, layout)) == task_key(spec)
    assert task_key(task_spec(params(target="file", target_path=str(data)), layout)) == task_key(spec)
    name = registered_name(relative, spec)
    assert name == f"rectflow-onestep-gaussian-to-file-my-data-v1-1x8x8-{task_key(spec)}"
    import re

    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name)


# ---- promotion, real MLflow -----------------------------------------------------------------------


def test_two_tasks_get_two_names_and_never_meet(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    ws1, ws2 = tmp_path / "n-moons", tmp_path / "moons-8g"
    ws1.mkdir(), ws2.mkdir()
    p1, p2 = params(store), params(store, source="moons", target="8gaussians")
    l1, l2 = prepared(ws1, p1), prepared(ws2, p2)

    stem1 = write_model(l1, seed=1)
    w2_v1 = score_model(p1, l1, stem1, "w2")
    write_eval(l1, w2=w2_v1)
    first = promote_in(ws1, p1)
    name1 = registered_name(p1, task_spec(p1, l1))
    assert first["decision"] == "champion" and first["detail"] == "first version"
    assert first["registered_model"] == name1 and first["metric"] == "w2" and first["task_key"] == task_key(task_spec(p1, l1))
    client = client_of(store)
    before = snapshot(client, name1)
    assert before["champion_tags"][TASK_KEY_TAG] == first["task_key"]
    assert json.loads(before["champion_tags"][TASK_TAG]) == task_spec(p1, l1)

    # the other task: a model that is far "better" on its own data takes its own name's champion
    write_model(l2, seed=2)
    write_eval(l2, w2=0.0)
    second = promote_in(ws2, p2)
    name2 = registered_name(p2, task_spec(p2, l2))
    assert name2 != name1 and name2.startswith("rectflow-onestep-moons-to-8gaussians-2-")
    assert second["registered_model"] == name2 and second["task_key"] != first["task_key"]
    assert (second["decision"], second["version"], second["detail"]) == ("champion", "1", "first version")
    assert snapshot(client, name1) == before  # the first task's champion untouched, no new versions

    # back in the first task: compared with its own champion only, re-measured on its own data
    write_model(l1, seed=3)
    write_eval(l1, w2=1e9)
    third = promote_in(ws1, p1)
    assert third["registered_model"] == name1 and third["decision"] == "challenger", third
    assert third["previous_w2"] == pytest.approx(w2_v1, rel=1e-4)  # v1 re-measured on this data
    assert str(client.get_model_version_by_alias(name1, "champion").version) == before["champion"]
    assert str(client.get_model_version_by_alias(name2, "champion").version) == "1"
    # an unchanged rerun registers nothing
    write_model(l1, seed=1)
    again = promote_in(ws1, p1)
    assert again["decision"] == "unchanged" and again["version"] == before["champion"]
    assert len(client.search_model_versions(f"name='{name1}'")) == 2


def test_forced_name_for_two_tasks_never_compares_them(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    ws1, ws2 = tmp_path / "n-moons", tmp_path / "moons-8g"
    ws1.mkdir(), ws2.mkdir()
    name = "rectflow-onestep"  # the old default, set explicitly: one name for both tasks
    p1, p2 = params(store, name), params(store, name, source="moons", target="8gaussians")
    l1, l2 = prepared(ws1, p1), prepared(ws2, p2)
    write_model(l1, seed=1)
    write_eval(l1, w2=1.0)
    assert promote_in(ws1, p1)["decision"] == "champion"
    client = client_of(store)
    before = snapshot(client, name)

    write_model(l2, seed=2)
    write_eval(l2, w2=0.0)  # would win any comparison
    out = promote_in(ws2, p2)
    assert out["registered_model"] == name and out["decision"] == "challenger", out
    assert out["detail"].startswith("champion v1 is another task (task ") and "gaussian -> moons" in out["detail"]
    assert "previous_w2" not in out
    champ = client.get_model_version_by_alias(name, "champion")
    assert str(champ.version) == "1" and dict(champ.tags) == before["champion_tags"]
    assert str(client.get_model_version_by_alias(name, "challenger").version) == out["version"] == "2"

    # a champion registered before task keys is another task too: not compared, not touched
    client.delete_model_version_tag(name, "1", TASK_KEY_TAG)
    client.delete_model_version_tag(name, "1", TASK_TAG)
    write_model(l1, seed=3)
    write_eval(l1, w2=0.0)
    out = promote_in(ws1, p1)
    assert out["decision"] == "challenger" and "registered without a rectflow.task_key tag" in out["detail"], out
    assert "gaussian -> moons" in out["detail"]  # from its old data.source / data.target tags
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_image_task_is_promoted_on_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import tasks.features
    from tasks.features import fd_scorer

    # prepare's feature net, trained for a few steps only: FD's quality does not matter here, only
    # that both sides of a comparison are measured with the same net
    monkeypatch.setattr(tasks.features, "train_feature_net",
                        functools.partial(tasks.features.train_feature_net, steps=10))

    store = tmp_path / "mlflow.db"
    ws = tmp_path / "digits"
    ws.mkdir()
    p = params(store, target="digits")
    layout = prepared(ws, p)
    spec = task_spec(p, layout)
    assert spec["shape"] == [1, 8, 8] and task_metric(spec) == "fd"
    scorer = fd_scorer(p, layout, torch.device("cpu"))
    assert scorer is not None
    x = torch.rand(200, 1, 8, 8)
    full, bare = scorer(x), scorer(x, se=False)  # se=False: the same FD, without the 30 bootstrap FDs
    assert full["fd_se"] > 0 and "fd_se" not in bare and bare["fd"] == full["fd"]

    stem = write_model(layout, seed=1)
    fd1 = score_model(p, layout, stem, "fd")
    assert fd1 is not None and fd1 > 0
    write_eval(layout, w2=0.5, fd=fd1)
    first = promote_in(ws, p)
    assert (first["decision"], first["metric"], first["fd"]) == ("champion", "fd", fd1)
    assert "-digits-1x8x8-" in first["registered_model"]
    client = client_of(store)
    v1 = client.get_model_version(first["registered_model"], first["version"])
    assert v1.tags["rectflow.metric"] == "fd" and float(v1.tags["fd"]) == pytest.approx(fd1, rel=1e-5)

    # FD decides, not W2: better FD with a terrible W2 wins ...
    write_model(layout, seed=2)
    write_eval(layout, w2=1e9, fd=0.0)
    second = promote_in(ws, p)
    assert second["decision"] == "champion" and second["metric"] == "fd", second
    assert second["previous_fd"] == pytest.approx(fd1, rel=1e-4)  # v1 re-measured on this data and noise
    assert "FD 0.0000 <" in second["detail"]
    # ... and a worse FD with a perfect W2 does not
    write_model(layout, seed=3)
    write_eval(layout, w2=0.0, fd=1e9)
    third = promote_in(ws, p)
    assert third["decision"] == "challenger" and third["metric"] == "fd" and "w2" not in third, third
    assert str(client.get_model_version_by_alias(first["registered_model"], "champion").version) == second["version"]
