"""BOSS step schedules in the pipeline: saved by pretrain, used by `rectflow sample --schedule bellman`
and by a couple round with ``couple.schedule: bellman`` (tiny workspace, in process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rectflow.models import load_model
from rectflow.schedule import load_schedule, schedule_path
from rectflow.solvers import solve
from tests.tinyws import OVERRIDES, cli, ws  # noqa: F401 (ws: a fixture)


def test_pretrain_saves_the_schedule_of_the_saved_weights(ws: Path) -> None:
    card = json.loads((ws / "models" / "rf1.json").read_text())
    doc = json.loads(schedule_path(ws / "models" / "rf1").read_text())
    assert doc["method"] == "bellman" and doc["meta"]["model_sha256"] == card["meta"]["sha256"]
    assert doc["meta"]["n_samples"] == 1024 and doc["meta"]["grid_points"] == 100
    rec = json.loads((ws / "metrics" / "pretrain.json").read_text())
    assert rec["schedule"] == "models/rf1.schedule.json" and rec["schedule_seconds"] > 0
    # recomputing from the reloaded model and the same source draws gives the same grids
    from rectflow.params import load_params
    from rectflow.layout import Layout
    from tasks._common import save_flow_schedule

    before = load_schedule(ws / "models" / "rf1")
    save_flow_schedule(load_params(ws / "params.yaml", OVERRIDES), Layout(ws), "rf1", torch.device("cpu"))
    after = load_schedule(ws / "models" / "rf1")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_sample_with_the_bellman_schedule(ws: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    out = ws / "boss.parquet"
    rc, stdout, err = cli(monkeypatch, capsys, "sample", "--model", str(ws / "models" / "rf1"), "--n", "64",
                          "--steps", "2", "--schedule", "bellman", "--seed", "7", "--out", str(out))
    assert rc == 0, err
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert printed["nfe"] == 2 and printed["schedule"] == "bellman"
    times = load_schedule(ws / "models" / "rf1")[2]
    assert len(times) == 3 and times[0] == 0 and times[-1] == 1 and 0 < times[1] < 1
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"rectflow"])
    assert meta["schedule"] == "bellman" and meta["nfe"] == 2 and meta["times"] == times.tolist()
    x = np.stack([table.column(f"d{i}").to_numpy() for i in range(2)], 1)
    model, _ = load_model(ws / "models" / "rf1")
    z0 = torch.randn((64, 2), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = solve(model, z0, "euler", times=times).x.numpy()
        uniform = solve(model, z0, "euler", 2).x.numpy()
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)
    if abs(float(times[1]) - 0.5) > 1e-9:
        assert not np.allclose(x, uniform)  # it really is another grid than 2 uniform steps


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--schedule", "bellman", "--solver", "rk45"], "--schedule: 'bellman' needs a fixed-step solver"),
        (["--schedule", "boss"], "--schedule: unknown 'boss'"),
        (["--schedule", "bellman", "--steps", "101"], "rf1.schedule.json: no schedule for K = 101"),
    ],
)
def test_sample_refuses_bad_schedules_in_one_line(ws: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str], args: list[str],
                                                  needle: str) -> None:
    rc, _, err = cli(monkeypatch, capsys, "sample", "--model", str(ws / "models" / "rf1"), "--out",
                     str(ws / "s.parquet"), *args)
    assert rc == 2
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (ws / "s.parquet").exists()


def test_sample_without_a_schedule_file_names_it(ws: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    schedule_path(ws / "models" / "rf1").unlink()
    rc, _, err = cli(monkeypatch, capsys, "sample", "--model", str(ws / "models" / "rf1.safetensors"), "--steps", "2",
                     "--schedule", "bellman", "--out", str(ws / "s.parquet"))
    assert rc == 2 and "rf1.schedule.json: no step schedule" in err and len(err.strip().splitlines()) == 1


def test_couple_round_on_the_bellman_schedule(ws: Path) -> None:
    from tasks.runner import run_stage
    from rectflow.pairs import read_manifest, read_shard
    from tasks.couple import sample_source, shard_seed

    small = [*OVERRIDES, "couple.n_pairs=600", "couple.shard_size=300", "couple.batch_size=300", "couple.steps=4"]
    uni = run_stage("couple", ws / "params.yaml", small, root=ws)
    assert uni["solver"]["schedule"] == "uniform" and "times" not in uni["solver"]
    fp_uniform = read_manifest(ws / "data/couplings/round-1")["fingerprint"]

    rec = run_stage("couple", ws / "params.yaml", [*small, "couple.schedule=bellman"], root=ws)
    assert rec["shards_made"] == 2 and rec["shards_reused"] == 0  # never the uniform round's pairs
    times = load_schedule(ws / "models" / "rf1")[4]
    man = read_manifest(ws / "data/couplings/round-1")
    assert man["fingerprint"] != fp_uniform
    assert man["solver"]["schedule"] == "bellman" and man["solver"]["times"] == times.tolist()
    assert man["solver"]["name"] == "euler" and man["solver"]["steps"] == 4
    assert rec["nfe_total"] == 4 * 2  # K Euler steps per batch, one batch per shard

    model, card = load_model(ws / "models" / "rf1")
    from rectflow.data import load_prepared

    source = load_prepared(ws / "data" / "prepared", "source", "train")
    for i, entry in enumerate(man["shards"]):
        z0, z1 = read_shard(ws / "data/couplings/round-1", entry, (2,))
        expected_z0 = sample_source(source, 300, shard_seed(0, 1, i), (2,))
        np.testing.assert_array_equal(z0, expected_z0.numpy())
        with torch.inference_mode():
            expected = solve(model, expected_z0, "euler", times=times).x.numpy()
        np.testing.assert_allclose(z1, expected, rtol=1e-6, atol=1e-6)

    again = run_stage("couple", ws / "params.yaml", [*small, "couple.schedule=bellman"], root=ws)
    assert again["shards_reused"] == 2  # the same schedule: reused

    # a schedule made for other weights is refused, naming the file
    doc = json.loads(schedule_path(ws / "models" / "rf1").read_text())
    doc["meta"]["model_sha256"] = "0" * 64
    schedule_path(ws / "models" / "rf1").write_text(json.dumps(doc))
    from rectflow.nets import ModelError

    with pytest.raises(ModelError, match="rf1.schedule.json: made for other weights"):
        run_stage("couple", ws / "params.yaml", [*small, "couple.schedule=bellman"], root=ws)


def test_dask_worker_reads_the_schedule_from_the_workspace(ws: Path, tmp_path: Path) -> None:
    """The Dask task's own code (:class:`tasks.couple.ShardJob`, called in process, no cluster): it loads rf1's schedule from the
    shared workspace, checks it against the hash the calling process saw, and writes the very shard
    the in-process path wrote."""
    from tasks.runner import run_stage
    from rectflow.params import load_params
    from rectflow.io import file_sha256
    from rectflow.nets import ModelError, read_model_card
    from rectflow.pairs import read_manifest
    from tasks import couple

    small = [*OVERRIDES, "couple.n_pairs=300", "couple.shard_size=300", "couple.batch_size=300", "couple.steps=3",
             "couple.schedule=bellman"]
    run_stage("couple", ws / "params.yaml", small, root=ws)
    man = read_manifest(ws / "data/couplings/round-1")
    p = load_params(ws / "params.yaml", small)
    sha = read_model_card(ws / "models" / "rf1")["meta"]["sha256"]
    staging = tmp_path / "staging"
    staging.mkdir()
    sched_sha = file_sha256(schedule_path(ws / "models" / "rf1"))
    threads = torch.get_num_threads()  # make_shard sets one thread, as in a worker process
    try:
        couple._WORKER_CACHE.clear()
        index, entry = couple.ShardJob(p, str(ws), 1, str(staging), sha, None, sched_sha)(0, 300)
        assert index == 0 and entry["sha256"] == man["shards"][0]["sha256"] and entry["nfe"] == 3
        couple._WORKER_CACHE.clear()
        with pytest.raises(ModelError, match="rf1.schedule.json: this worker sees another step schedule"):
            couple.ShardJob(p, str(ws), 1, str(staging), sha, None, "0" * 64)(0, 300)
    finally:
        couple._WORKER_CACHE.clear()
        torch.set_num_threads(threads)


def test_reflowed_rounds_use_couple_reflowed(ws: Path) -> None:
    """Rounds ≥ 2 take ``couple.reflowed``'s keys; round 1 neither changes nor is remade by them."""
    import shutil

    from tasks.runner import run_stage
    from rectflow.params import load_params
    from rectflow.layout import Layout
    from rectflow.pairs import read_manifest
    from tasks.couple import run_round

    small = [*OVERRIDES, "couple.n_pairs=600", "couple.shard_size=300", "couple.batch_size=300", "couple.steps=4"]
    later = ["couple.reflowed.n_pairs=900", "couple.reflowed.steps=2", "couple.reflowed.schedule=bellman"]
    run_stage("couple", ws / "params.yaml", small, root=ws)
    fp1 = read_manifest(ws / "data/couplings/round-1")["fingerprint"]
    again = run_stage("couple", ws / "params.yaml", [*small, *later], root=ws)
    assert again["shards_reused"] == 2 and read_manifest(ws / "data/couplings/round-1")["fingerprint"] == fp1

    for suffix in (".safetensors", ".json", ".schedule.json"):  # rf1's weights stand in for an rf2
        shutil.copy(ws / "models" / f"rf1{suffix}", ws / "models" / f"rf2{suffix}")
    rec = run_round(load_params(ws / "params.yaml", [*small, *later]), Layout(ws), 2)
    man = read_manifest(ws / "data/couplings/round-2")
    assert man["n_pairs"] == 900 and len(man["shards"]) == 3 and rec["nfe_total"] == 2 * 3
    assert man["solver"]["steps"] == 2 and man["solver"]["schedule"] == "bellman"
    assert man["solver"]["times"] == load_schedule(ws / "models" / "rf2")[2].tolist()
    assert read_manifest(ws / "data/couplings/round-1")["n_pairs"] == 600  # round 1 untouched


def test_students_learn_round_one_without_a_last_round(ws: Path) -> None:
    """distill.pairs_round: 1: the reflow stage trains rf2 and makes no round 2; the student starts
    from rf2 and learns round 1's pairs (its card names them); evaluate's transport costs cover the
    rounds made."""
    from rectflow.pairs import read_manifest
    from tasks.runner import run_stage

    over = [*OVERRIDES, "distill.pairs_round=1"]
    for name in ("couple", "reflow", "distill"):
        run_stage(name, ws / "params.yaml", over, root=ws)
    assert (ws / "models" / "rf2.safetensors").is_file() and not (ws / "data/couplings/round-2").exists()
    card = json.loads((ws / "models" / "distilled.json").read_text())
    fp1 = read_manifest(ws / "data/couplings/round-1")["fingerprint"]
    assert card["meta"]["pairs_round"] == 1 and card["meta"]["parent"] == "rf2"
    assert card["meta"]["inputs"]["round-1"] == fp1 and "round-2" not in card["meta"]["inputs"]
    rec = json.loads((ws / "metrics" / "reflow.json").read_text())
    assert rec["rounds"][0]["couple"] == {} and rec["rounds"][0]["train"]["steps_run"] > 0
    run_stage("evaluate", ws / "params.yaml", [*over, "quantize.variants=[]"], root=ws)
    summary = json.loads((ws / "metrics" / "evaluate.json").read_text())
    assert "transport_cost/round-1" in summary and "transport_cost/round-2" not in summary
