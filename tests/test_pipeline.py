"""The seven stages end to end on tiny configs (in process, no Prefect/MLflow/DVC)."""

from __future__ import annotations

import json
import shutil

import pytest

from rectflow.cli import run_stage
from tasks import STAGES

FIELDS = {"model", "solver", "nfe", "w2", "mmd", "straightness", "transport_cost", "latency_ms", "params", "bytes"}


def run_all(tmp_path, root, overrides):
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    records = {}
    for stage in STAGES:
        records[stage] = run_stage(stage, tmp_path / "params.yaml", overrides, root=tmp_path)
    return records


def test_noise_to_moons(tmp_path, root, tiny_overrides):
    rec = run_all(tmp_path, root, tiny_overrides)
    rows = json.loads((tmp_path / "metrics" / "eval.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"rf1", "rf2", "distilled", "distilled-int8", "distilled-bf16"}
    for r in rows:
        assert FIELDS <= set(r)
        assert r["nfe"] == (1 if r["model"].startswith("distilled") else r["nfe"])
    assert [r["nfe"] for r in rows if r["model"] == "rf1"] == [1, 4]
    for name in ("rf1", "rf2", "distilled", "distilled-int8", "distilled-bf16"):
        assert (tmp_path / "models" / f"{name}.safetensors").is_file()
        assert (tmp_path / "models" / f"{name}.json").is_file()
    for k in (1, 2):
        man = json.loads((tmp_path / "data" / "couplings" / f"round-{k}" / "manifest.json").read_text())
        assert man["complete"] and len(man["shards"]) == 3 and man["model"]["name"] == f"rf{k}"
    s = rec["evaluate"]
    assert s["transport_cost/round-1"] < s["transport_cost/independent"]
    assert (tmp_path / "plots" / "nfe_w2.csv").read_text().splitlines()[0] == "nfe,rf1,rf2"
    assert (tmp_path / "plots" / "trajectories.png").stat().st_size > 10_000
    assert not list((tmp_path / "models").glob(".*.tmp"))


def test_transport_between_two_data_sets(tmp_path, root, tiny_overrides):
    rec = run_all(tmp_path, root, tiny_overrides + ["data.source=8gaussians", "data.target=moons"])
    assert rec["prepare"]["source"]["kind"] == "8gaussians"
    assert (tmp_path / "data" / "prepared" / "source-train.npy").is_file()
    assert rec["evaluate"]["transport_cost/round-1"] < rec["evaluate"]["transport_cost/independent"]


@pytest.mark.parametrize("stage", ["pretrain", "couple", "evaluate"])
def test_stage_without_its_inputs_says_what_to_run(tmp_path, root, stage):
    from rectflow.data import DataError
    from rectflow.nets import ModelError

    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises((DataError, ModelError), match="prepare|not found|missing"):
        run_stage(stage, tmp_path / "params.yaml", [], root=tmp_path)
