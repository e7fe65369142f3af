"""Data that grows (#19): a folder of Parquet files is one data set, read streaming; train/test is
split by a stable hash, so held-out rows stay held out as data arrives; the data's content version
is a DVC dependency, in ``meta.json``, in MLflow (a dataset input) and in the Prefect artifact; the
nightly deployment retrains on new data and says "no new data since version X" otherwise."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rectflow.tables import data_version, hash_split, read_parquet, row_hashes
from tests.workspace import BIN, clone_workspace, dvc, env


def write_day(folder: Path, name: str, x: np.ndarray, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1]} | extra), folder / name)


def rows(a: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in a}


# ---- the split ------------------------------------------------------------------------------------


def test_held_out_rows_stay_held_out_when_data_is_added_in_any_order():
    rng = np.random.default_rng(3)
    v1 = rng.normal(size=(20_000, 2)).astype(np.float32)
    v2 = np.concatenate([v1, rng.normal(size=(7_000, 2)).astype(np.float32)])[rng.permutation(27_000)]
    train1, test1 = hash_split(v1, 0.1, 0, "v1")
    train2, test2 = hash_split(v2, 0.1, 0, "v2")
    assert rows(test1) <= rows(test2) and rows(train1) <= rows(train2) and not rows(train2) & rows(test2)
    assert abs(len(test1) / len(v1) - 0.1) < 0.01 and abs(len(test2) / len(v2) - 0.1) < 0.01
    assert not rows(hash_split(v1, 0.1, 1, "v1")[1]) == rows(test1)  # the seed salts the hash


def test_a_prefix_of_the_held_out_rows_is_a_uniform_sample_whatever_the_file_order():
    """evaluate scores on the first n_samples held-out rows: with old data first in the files, a
    split in file order would score a grown data set on its oldest rows alone."""
    rng = np.random.default_rng(5)
    old, new = rng.normal(size=(20_000, 2)), rng.normal(size=(10_000, 2)) + 10.0
    _, test = hash_split(np.concatenate([old, new]).astype(np.float32), 0.1, 0, "grown")
    share_new = float((test[:1000, 0] > 5).mean())  # a third of the rows are new
    assert abs(share_new - 1 / 3) < 0.06, share_new


def test_an_id_column_decides_the_side_whatever_the_values():
    x = np.random.default_rng(0).normal(size=(5_000, 2)).astype(np.float32)
    ids = np.array([f"user-{i}" for i in range(5_000)], dtype=object)
    _, test = hash_split(np.c_[x, np.arange(5_000)], 0.2, 0, "x", ids)
    _, test_edited = hash_split(np.c_[x + 1, np.arange(5_000)], 0.2, 0, "x", ids)  # every value changed
    assert np.array_equal(test[:, 2], test_edited[:, 2])  # the same rows, in the same (hash) order
    assert np.array_equal(row_hashes(x, 0), row_hashes(x.copy(), 0))


def test_two_rows_are_split_one_each_and_one_is_refused():
    train, test = hash_split(np.zeros((2, 2), np.float32) + [[0], [1]], 0.1, 0, "tiny")
    assert len(train) == len(test) == 1
    with pytest.raises(ValueError, match="tiny: 1 row"):
        hash_split(np.zeros((1, 2), np.float32), 0.1, 0, "tiny")


# ---- a folder of Parquet files ------------------------------------------------------------------


def test_a_folder_is_read_as_one_table_with_memory_flat_in_the_number_of_files(tmp_path):
    rng = np.random.default_rng(1)
    days = [rng.normal(size=(4_000, 2)) for _ in range(40)]
    for i, d in enumerate(days):
        write_day(tmp_path / "days", f"day-{i:03d}.parquet", d)
    tracemalloc.start()
    x, ids = read_parquet(tmp_path / "days")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert ids is None and x.dtype == np.float32
    assert np.array_equal(x, np.concatenate(days).astype(np.float32))
    # the output (1.28 MB) plus one file's batch in its own types, never every file at once (5+ MB)
    assert peak < x.nbytes + 3 * days[0].nbytes, (peak, x.nbytes)


def test_the_data_version_changes_when_a_file_is_added_edited_or_removed(tmp_path):
    folder = tmp_path / "days"
    x = np.random.default_rng(2).normal(size=(100, 2))
    write_day(folder, "d1.parquet", x)
    v1 = data_version(folder)
    assert data_version(folder) == v1 and v1["files"] == 1
    write_day(folder, "d2.parquet", x + 1)
    v2 = data_version(folder)
    write_day(folder, "d2.parquet", x + 2)
    v3 = data_version(folder)
    (folder / "d2.parquet").unlink()
    assert len({v1["digest"], v2["digest"], v3["digest"]}) == 3 and v2["files"] == 2
    assert data_version(folder) == v1  # back to v1's files: v1's version


# ---- the nightly deployment on a real Prefect server -----------------------------------------------

from tests.test_orchestration import prefect_env, prefect_server  # noqa: E402,F401 - the session's server


def _trigger(ws: Path, serve: subprocess.Popen, pe: dict[str, str]) -> tuple[str, str]:
    """One UI-style run of rectflow-pipeline/nightly; (flow run id, its evaluation artifact)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def scenario() -> tuple[str, str]:
        async with get_client() as c:
            dep = None
            for _ in range(240):
                try:
                    dep = await c.read_deployment_by_name("rectflow-pipeline/nightly")
                    break
                except Exception:
                    if serve.poll() is not None:
                        raise RuntimeError((ws / "serve.log").read_text()[-3000:]) from None
                    await asyncio.sleep(0.5)
            assert dep is not None, (ws / "serve.log").read_text()[-3000:]
            fr = await c.create_flow_run_from_deployment(dep.id, parameters=dict(dep.parameters))
            for _ in range(1800):
                fr = await c.read_flow_run(fr.id)
                if fr.state and fr.state.is_final():
                    break
                await asyncio.sleep(0.5)
            assert fr.state.is_completed(), (fr.state, (ws / "serve.log").read_text()[-4000:])
            arts = [a for a in await c.read_artifacts() if a.key == "rectflow-evaluation" and a.flow_run_id == fr.id]
            assert arts, "no evaluation artifact for the run"
            return str(fr.id), arts[-1].data or ""

    with temporary_settings({PREFECT_API_URL: pe["PREFECT_API_URL"]}):
        return asyncio.run(scenario())


def _parent(ws: Path, flow_run_id: str):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rectflow")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("prefect.flow_run_id") == flow_run_id
                  and "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.tags.get("rectflow.stage"): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, children


def _lock_hash(ws: Path, path: str) -> str:
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    dep = next(d for d in lock["stages"]["prepare"]["deps"] if d["path"] == path)
    return dep["md5"]


@pytest.mark.slow
def test_nightly_retrains_on_new_data_and_says_when_there_is_none(tmp_path, prefect_server):  # noqa: F811
    from tests.conftest import TINY

    ws = clone_workspace(tmp_path / "ws", [*TINY, "data.target=file", "data.target_path=inputs/days"])
    rng = np.random.default_rng(0)
    write_day(ws / "inputs" / "days", "2026-11-30.parquet", rng.normal(size=(3_000, 2)))
    pe = prefect_env(prefect_server)
    serve = subprocess.Popen([str(BIN / "rectflow"), "serve"], cwd=ws, env=env(RECTFLOW_THREADS="1", **pe),
                             stdout=open(ws / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        first, art1 = _trigger(ws, serve, pe)
        v1 = data_version(ws / "inputs" / "days")["digest"]
        test_v1 = rows(np.load(ws / "data" / "prepared" / "target-test.npy"))
        hash_v1 = _lock_hash(ws, "inputs/days")
        # a new day arrives: the chain reruns on it
        write_day(ws / "inputs" / "days", "2026-12-01.parquet", rng.normal(size=(2_000, 2)) + 1.0)
        second, art2 = _trigger(ws, serve, pe)
        v2 = data_version(ws / "inputs" / "days")["digest"]
        # and nothing new: nothing runs, and the run says so
        third, art3 = _trigger(ws, serve, pe)
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    assert v1 != v2
    assert f"data.target: version {v1[:12]}" in art1
    assert f"data.target: new data, version {v2[:12]} (2 file(s)) after {v1[:12]}; W2 " in art2, art2[:2000]
    assert "Stages run: prepare, pretrain, couple, reflow, distill, quantize, evaluate" in art2, art2[:600]
    assert "Stages run: none (all up to date)" in art3 and f"no new data since version {v2[:12]}" in art3, art3[:600]
    assert _lock_hash(ws, "inputs/days") != hash_v1  # DVC's own hash of the folder moved with it
    assert "Data and pipelines are up to date" in dvc("status", cwd=ws).stdout
    # v1's held-out rows are still held out (and none of v1's training rows is)
    test_v2 = rows(np.load(ws / "data" / "prepared" / "target-test.npy"))
    train_v2 = rows(np.load(ws / "data" / "prepared" / "target-train.npy"))
    assert test_v1 <= test_v2 and not test_v1 & train_v2
    # MLflow: each parent run has the data set as an input with its digest; the drift is prepare's metric
    for flow_run, version in ((first, v1), (second, v2), (third, v2)):
        parent, children = _parent(ws, flow_run)
        inputs = parent.inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("data.target", version[:32])]
        assert json.loads(inputs[0].dataset.source)["uri"] == str((ws / "inputs" / "days").resolve())
        assert parent.data.tags["rectflow.data.target.version"] == version
    # one DAG: plain `dvc repro` sees a new file as the flow does, and the flow then has nothing to do
    write_day(ws / "inputs" / "days", "2026-12-02.parquet", rng.normal(size=(500, 2)))
    rep = dvc("repro", cwd=ws)
    assert rep.returncode == 0 and "Running stage 'prepare'" in rep.stdout, rep.stdout[-3000:] + rep.stderr[-2000:]
    from tests.workspace import rectflow

    after = rectflow("run", cwd=ws, timeout=600, RECTFLOW_THREADS="1", **pe)
    assert after.returncode == 0 and json.loads(after.stdout.strip().splitlines()[-1])["executed"] == [], after.stderr
    parent3, _ = _parent(ws, third)
    assert parent3.data.tags["rectflow.data"].startswith(f"data.target: no new data since version {v2[:12]}")
    _, children2 = _parent(ws, second)
    assert children2["prepare"].data.metrics["data/target/drift/w2"] > 0.3  # the new day is shifted by 1


@pytest.mark.slow
def test_finetune_starts_pretrain_from_the_champions_flow_only_on_new_data(tmp_path):
    from tests.conftest import TINY
    from tests.workspace import rectflow

    ws = clone_workspace(tmp_path / "ws", [*TINY, "data.target=file", "data.target_path=inputs/days",
                                           "schedule.on_new_data=finetune", "schedule.finetune_steps=40"])
    rng = np.random.default_rng(1)
    write_day(ws / "inputs" / "days", "d1.parquet", rng.normal(size=(3_000, 2)))

    def run(*sets: str) -> dict:
        r = rectflow("run", *[a for s in sets for a in ("--set", s)], cwd=ws, timeout=900, RECTFLOW_THREADS="1")
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    first = run()  # no champion yet: from scratch
    card1 = json.loads((ws / "models" / "rf1.json").read_text())
    assert "warm_start" not in card1["meta"] and card1["meta"]["train"]["steps"] == 150
    champion = f"{first['promotion']['registered_model']} v{first['promotion']['version']}"
    write_day(ws / "inputs" / "days", "d2.parquet", rng.normal(size=(1_000, 2)) + 1.0)
    run()
    card2 = json.loads((ws / "models" / "rf1.json").read_text())
    warm = card2["meta"]["warm_start"]
    assert warm["champion"] == champion and warm["sha256"] == card1["meta"]["sha256"]
    assert card2["meta"]["train"]["steps"] == 40 and card2["meta"]["inputs"]["warm_start"] == warm["sha256"]
    # params changed, data not: pretrain reruns, from the same champion's flow (kept for this data
    # version: rf1 is a function of that flow, the data and the params), not from whatever is champion now
    again = run("pretrain.lr=0.002")
    assert "pretrain" in again["executed"] and "prepare" not in again["executed"]
    card3 = json.loads((ws / "models" / "rf1.json").read_text())
    assert card3["meta"]["train"]["steps"] == 40  # still that data version: still the fine-tune of its champion
