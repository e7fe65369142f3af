"""Prefect + DVC + MLflow for real: a Prefect server on loopback, the nightly deployment, runs
triggered through the API as the UI does, MLflow parent/child runs, and model promotion."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rectflow.stages import STAGES
from tests.workspace import BIN, clone_workspace, dvc, env, free_port, rectflow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback, started once per pytest run."""
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    e = env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
            PREFECT_API_URL=url, PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=e, stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except Exception:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        raise RuntimeError("prefect server did not become healthy in 120 s")
    yield {"url": url, "home": str(home)}
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_overrides_module):
    return clone_workspace(tmp_path_factory.mktemp("ws"), tiny_overrides_module)


@pytest.fixture(scope="module")
def tiny_overrides_module():
    from tests.conftest import TINY

    return list(TINY)


def prefect_env(server) -> dict[str, str]:
    return {"PREFECT_API_URL": server["url"], "PREFECT_HOME": server["home"]}


def mlflow_runs(ws: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rectflow")
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_run_then_dvc_has_nothing_to_do_and_back(workspace, prefect_server):
    r = rectflow("run", cwd=workspace, **prefect_env(prefect_server))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["promotion"]["decision"] == "champion"
    assert out["executed"] == list(STAGES)
    st = dvc("status", cwd=workspace)
    assert "Data and pipelines are up to date" in st.stdout, st.stdout
    # change a parameter, reproduce with DVC: the flow then has nothing left to do
    text = (workspace / "params.yaml").read_text().replace("n_samples: 300", "n_samples: 250")
    (workspace / "params.yaml").write_text(text)
    rep = dvc("repro", cwd=workspace)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "Running stage 'evaluate'" in rep.stdout and "Running stage 'pretrain'" not in rep.stdout
    r2 = rectflow("run", cwd=workspace, **prefect_env(prefect_server))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert json.loads(r2.stdout.strip().splitlines()[-1])["executed"] == []
    client, runs = mlflow_runs(workspace)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[-1].info.run_id]
    assert sorted(c.data.tags["rectflow.stage"] for c in children) == sorted(STAGES)
    # every stage run's params are the resolved file's values, as logged by the parent
    import yaml

    from flows.tracking import flatten

    resolved = flatten(yaml.safe_load((workspace / "params.resolved.yaml").read_text()))
    want = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in resolved.items()}
    latest = parents[0]  # the second run: the params that params.resolved.yaml now holds
    assert {k: v for k, v in latest.data.params.items() if k in want} == want
    for c in (r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest.info.run_id):
        stage = c.data.tags["rectflow.stage"]
        assert stage == "resolve" or c.data.params, stage
        assert all(want[k] == v for k, v in c.data.params.items()), stage
    first = parents[-1]
    pre = next(c for c in children if c.data.tags["rectflow.stage"] == "pretrain")
    hist = client.get_metric_history(pre.info.run_id, "train/rf1/loss")
    assert len(hist) == 6 and [m.step for m in hist] == [25, 50, 75, 100, 125, 150]
    assert first.data.tags["git_commit"] != "unknown" and first.data.tags["prefect.flow_run_id"]
    assert any(k.startswith("dvc.out.data/couplings") for c in children for k in c.data.tags)


def test_promotion_only_on_merit(workspace, prefect_server):
    """A worse model does not take `champion`; a better one does (real runs, tiny config)."""
    from mlflow import MlflowClient

    pe = prefect_env(prefect_server)
    from flows.registry import registered_name, task_spec
    from rectflow.layout import Layout
    from rectflow.params import load_params

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    p = load_params(workspace / "params.yaml")
    name = registered_name(p, task_spec(p, Layout(workspace)))  # derived from the task
    champ0 = client.get_model_version_by_alias(name, "champion")  # from the first test's run
    # a worse student: 1 distillation step leaves it close to rf2 at one step
    bad = rectflow("run", "--set", "distill.steps=2", cwd=workspace, **pe)
    assert bad.returncode == 0, bad.stderr[-3000:]
    promo = json.loads(bad.stdout.strip().splitlines()[-1])["promotion"]
    assert promo["decision"] == "challenger", promo
    assert promo["w2"] >= promo["previous_w2"]  # both measured on the same data and noise
    assert client.get_model_version_by_alias(name, "champion").version == champ0.version
    assert str(client.get_model_version_by_alias(name, "challenger").version) == promo["version"]
    # a better student: longer distillation than the champion's
    good = rectflow("run", "--set", "distill.steps=400", cwd=workspace, **pe)
    assert good.returncode == 0, good.stderr[-3000:]
    promo = json.loads(good.stdout.strip().splitlines()[-1])["promotion"]
    assert promo["decision"] == "champion", promo
    assert promo["w2"] < promo["previous_w2"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == promo["version"] != str(champ0.version)
    # and the champion samples from a fresh shell
    out = workspace / "champion.parquet"
    s = rectflow("sample", "--model", f"models:/{name}@champion", "--n", "64", "--steps", "1", "--out", str(out),
                 cwd=workspace, MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlflow.db'}")
    assert s.returncode == 0, s.stderr[-2000:]
    import pyarrow.parquet as pq

    assert pq.read_table(out).num_rows == 64


def test_deployment_schedule_and_ui_style_trigger(workspace, prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pe = prefect_env(prefect_server)
    serve = subprocess.Popen([str(BIN / "rectflow"), "serve"], cwd=workspace, env=env(**pe),
                             stdout=open(workspace / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async def scenario():
            async with get_client() as c:
                dep = None
                for _ in range(240):
                    try:
                        dep = await c.read_deployment_by_name("rectflow-pipeline/nightly")
                        break
                    except Exception:
                        if serve.poll() is not None:
                            raise RuntimeError((workspace / "serve.log").read_text()[-3000:])
                        await asyncio.sleep(0.5)
                assert dep is not None, (workspace / "serve.log").read_text()[-3000:]
                sched = dep.schedules[0].schedule
                assert sched.cron == "0 2 * * *" and sched.timezone == "UTC"
                assert dep.concurrency_limit == 1 or dep.global_concurrency_limit is not None
                # exactly what the UI sends: the whole form, one field changed
                form = dict(dep.parameters)
                form["params"]["evaluate"]["n_samples"] = 200
                fr = await c.create_flow_run_from_deployment(dep.id, parameters=form)
                for _ in range(1200):
                    fr = await c.read_flow_run(fr.id)
                    if fr.state and fr.state.is_final():
                        break
                    await asyncio.sleep(0.5)
                assert fr.state.is_completed(), (fr.state, (workspace / "serve.log").read_text()[-4000:])
                arts = await c.read_artifacts()
                assert any(a.key == "rectflow-evaluation" and "| model | solver |" in (a.data or "") for a in arts)
                return fr.id

        with temporary_settings({PREFECT_API_URL: pe["PREFECT_API_URL"]}):
            flow_run_id = asyncio.run(scenario())
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    _, runs = mlflow_runs(workspace)
    parent = next(r for r in runs if r.data.tags.get("prefect.flow_run_id") == str(flow_run_id) and "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.params["evaluate.n_samples"] == "200"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(STAGES)
    assert "evaluate.n_samples=200" in parent.data.params["overrides"]
