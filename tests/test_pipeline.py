"""The seven stages end to end on tiny configs (in process, no Prefect/MLflow/DVC)."""

from __future__ import annotations

import json
import shutil

import pytest

from tasks.runner import run_stage
from rectflow.stages import PIPELINE as STAGES

FIELDS = {"model", "solver", "schedule", "nfe", "w2", "mmd", "straightness", "transport_cost", "latency_ms", "params", "bytes"}


def run_all(tmp_path, root, overrides):
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    records = {}
    for stage in STAGES:
        records[stage] = run_stage(stage, tmp_path / "params.yaml", overrides, root=tmp_path)
    return records


def test_noise_to_moons(tmp_path, root, tiny_overrides):
    rec = run_all(tmp_path, root, tiny_overrides)
    rows = json.loads((tmp_path / "metrics" / "eval.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"rf1", "rf2", "distilled", "distilled-int8", "distilled-int4", "distilled-bf16"}
    for r in rows:
        assert FIELDS <= set(r)
        assert r["nfe"] == (1 if r["model"].startswith("distilled") else r["nfe"])
    assert [r["nfe"] for r in rows if r["model"] == "rf1" and r["schedule"] == "uniform"] == [1, 4]
    for name in ("rf1", "rf2", "distilled", "distilled-int8", "distilled-int4", "distilled-bf16"):
        assert (tmp_path / "models" / f"{name}.safetensors").is_file()
        assert (tmp_path / "models" / f"{name}.json").is_file()
    # BOSS step schedules beside every flow (and only flows), one per K = 1 … bellman.grid_points
    from rectflow.schedule import load_schedule, schedule_path

    for name, stage in (("rf1", "pretrain"), ("rf2", "reflow")):
        card = json.loads((tmp_path / "models" / f"{name}.json").read_text())
        doc = json.loads(schedule_path(tmp_path / "models" / name).read_text())
        assert doc["meta"]["model_sha256"] == card["meta"]["sha256"] and doc["meta"]["grid_points"] == 100
        scheds = load_schedule(tmp_path / "models" / name)
        assert sorted(scheds) == list(range(1, 101))
        for k, t in scheds.items():
            assert len(t) == k + 1 and t[0] == 0.0 and t[-1] == 1.0 and bool((t[1:] > t[:-1]).all())
        assert scheds[100].tolist() == pytest.approx([i / 100 for i in range(101)])
    assert rec["pretrain"]["schedule_seconds"] > 0
    assert rec["reflow"]["rounds"][0]["train"]["schedule"].endswith("rf2.schedule.json")
    assert not schedule_path(tmp_path / "models" / "distilled").exists()
    boss = [r for r in rows if r["schedule"] == "bellman"]
    assert [(r["model"], r["solver"], r["nfe"]) for r in boss] == [("rf1", "euler", 2), ("rf2", "euler", 2)]
    assert {r["schedule"] for r in rows} == {"uniform", "bellman"}
    s = rec["evaluate"]
    assert "w2/rf1/euler-bellman/2" in s and "w2/rf1/euler/1" in s and "w2/rf1/euler/2" not in s
    for r in boss:
        assert s[f"w2/{r['model']}/euler-bellman/2"] == round(r["w2"], 5)
    # the rf2 row is exactly Euler on rf2's saved K = 2 grid, from the evaluation noise
    import torch

    from rectflow import metrics
    from rectflow.params import load_params
    from rectflow.data import load_prepared
    from rectflow.layout import Layout
    from rectflow.models import load_model
    from rectflow.solvers import solve
    from tasks.evaluate import eval_noise

    p, layout = load_params(tmp_path / "params.yaml", tiny_overrides), Layout(tmp_path)
    ref = load_prepared(layout.prepared, "target", "test").data[: p.evaluate.n_samples]
    z0 = eval_noise(p, layout, p.evaluate.n_samples, (2,))
    model, _ = load_model(layout.model("rf2"))
    with torch.inference_mode():
        x = solve(model, z0, "euler", times=load_schedule(layout.model("rf2"))[2]).x
    assert metrics.w2(x, ref) == pytest.approx(boss[1]["w2"], rel=1e-6)
    for k in (1, 2):
        man = json.loads((tmp_path / "data" / "couplings" / f"round-{k}" / "manifest.json").read_text())
        assert man["complete"] and len(man["shards"]) == 3 and man["model"]["name"] == f"rf{k}"
    assert s["transport_cost/round-1"] < s["transport_cost/independent"]
    csv_lines = (tmp_path / "plots" / "nfe_w2.csv").read_text().splitlines()
    assert csv_lines[0] == "nfe,rf1,rf2,rf1-bellman,rf2-bellman"
    by_nfe = {line.split(",")[0]: line.split(",")[1:] for line in csv_lines[1:]}
    assert by_nfe["2"][:2] == ["", ""] and all(by_nfe["2"][2:])  # only the BOSS rows at NFE 2
    assert all(by_nfe["1"][:2]) and by_nfe["1"][2:] == ["", ""]
    assert (tmp_path / "plots" / "trajectories.png").stat().st_size > 10_000
    assert not list((tmp_path / "models").glob(".*.tmp"))
    assert_declared_outputs_exist(tmp_path, root)
    # promotion reuses evaluate's W2 of the one-step model: the very number score_one_step measures
    from flows.registry import _evaluated
    from tasks.evaluate import score_one_step

    assert _evaluated(layout, 1)["w2"] == pytest.approx(score_one_step(p, layout, layout.model("distilled")), rel=1e-9)


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


def declared_outputs(root, stage: str, doc: dict | None = None) -> list[str]:
    """Every path dvc.yaml (or the generated ``doc``) declares as an output of ``stage`` (outs,
    metrics, plots)."""
    import yaml

    spec = (doc or yaml.safe_load((root / "dvc.yaml").read_text()))["stages"][stage]
    paths = []
    for kind in ("outs", "metrics", "plots"):
        for item in spec.get(kind, []):
            paths.append(item if isinstance(item, str) else next(iter(item)))
    return paths


def assert_declared_outputs_exist(tmp_path, root, overrides: list[str] | None = None) -> None:
    """DVC fails a stage whose declared output is missing: every stage must make all of its own.
    With ``overrides``, the dvc.yaml is the one `rectflow run` writes for those params (the
    repository's own is for params.yaml alone)."""
    spec = None
    if overrides is not None:
        from rectflow.dvcyaml import generate
        from rectflow.params import load_params

        spec = generate(load_params(tmp_path / "params.yaml", overrides), root)
    missing = [(stage, path) for stage in STAGES for path in declared_outputs(root, stage, spec)
               if not (tmp_path / path).exists()]
    assert not missing, f"declared in dvc.yaml but not made: {missing}"


# A digits pipeline small enough for a test: a U-Net of two levels, a few steps per stage.
TINY_DIGITS = [
    "data.target=digits", "model.channels=8", "model.channel_mult=[1, 2]", "model.attention=true",
    "pretrain.steps=30", "pretrain.batch_size=32", "pretrain.log_every=10", "pretrain.checkpoint_every=10",
    "couple.n_pairs=192", "couple.shard_size=96", "couple.batch_size=96", "couple.solver=euler", "couple.steps=4",
    "reflow.steps=20", "reflow.batch_size=32", "reflow.log_every=10", "reflow.checkpoint_every=10",
    "distill.steps=20", "distill.batch_size=32", "distill.log_every=10", "distill.checkpoint_every=10",
    "bellman.n_samples=16", "bellman.grid_points=10", "evaluate.n_samples=100", "evaluate.latency_batch=16",
    "evaluate.grid=[{models: flows, solver: euler, steps: [1, 2]}, {models: flows, solver: euler, steps: [2], "
    "schedule: bellman}, {models: students, solver: euler}]",
]


def test_digits_end_to_end(tmp_path, root):
    """Images through all seven stages: FD on every row, sample grids, the side-by-side figure,
    image trajectories, and every output dvc.yaml declares (what `dvc repro` checks); FID beside FD
    with a (tiny, scripted) Inception detector file given as `evaluate.inception`."""
    from tests.test_fid import scripted

    (tmp_path / "detector").mkdir()
    detector = scripted(tmp_path / "detector")
    rec = run_all(tmp_path, root, [*TINY_DIGITS, f"evaluate.inception={detector}"])
    assert rec["prepare"]["target"]["shape"] == [1, 8, 8]
    # the images profile: the student starts from rf2 and learns round 1's pairs; no round 2 is made
    assert not (tmp_path / "data" / "couplings" / "round-2").exists()
    card = json.loads((tmp_path / "models" / "distilled.json").read_text())["meta"]
    assert card["pairs_round"] == 1 and card["parent"] == "rf2" and set(card["inputs"]) == {"rf2", "round-1"}
    rows = json.loads((tmp_path / "metrics" / "eval.json").read_text())["rows"]
    sha = {r["fd_net_sha256"] for r in rows}
    assert len(sha) == 1 and len(next(iter(sha))) == 64
    from rectflow.io import file_sha256

    for r in rows:
        assert r["fd"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert r["fid"] >= 0 and r["fid_net_sha256"] == file_sha256(detector)
        assert (tmp_path / "plots" / "samples" / f"{r['model']}-{r['solver']}-nfe{r['nfe']}"
                f"{'-bellman' if r['schedule'] == 'bellman' else ''}.png").is_file()
    assert (tmp_path / "plots" / "side_by_side.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "trajectories.png").stat().st_size > 1000
    # running backwards: every flow reconstructs the held-out images (PSNR), both models inpaint them
    ev = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    recon = {(r["model"], r["solver"], r["steps"]): r for r in ev["reconstruction"]}
    assert len(recon) == 2 * (3 * 4 + 1) and all(r["mse"] >= 0 and "psnr" in r for r in recon.values())
    assert recon[("rf1", "midpoint", 4)]["nfe"] == 8 and recon[("rf2", "rk45", None)]["nfe_total"] > 2
    inp = {(r["model"], r["mask"]): r for r in ev["inpainting"]}
    assert set(inp) == {(m, k) for m in ("rf2", "distilled") for k in ("half", "centre", "random")} | {("held-out", "none")}
    assert inp[("rf2", "half")]["nfe"] == 20 and inp[("distilled", "random")]["nfe"] == 2
    assert all(r["fd"] >= 0 and r["masked_mse"] >= 0 for r in inp.values())
    assert (tmp_path / "plots" / "inpainting.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "reconstruction.png").stat().st_size > 1000
    assert_declared_outputs_exist(tmp_path, root, [*TINY_DIGITS, f"evaluate.inception={detector}"])
