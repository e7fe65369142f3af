"""A student of its own architecture (issue #17, ``distill.student``): smaller, randomly initialised,
and everything downstream (quantize, evaluate, sample) reads its card."""

from __future__ import annotations

import json

from rectflow.models import load_model
from rectflow.nets import count_params
from tasks.runner import run_stage
from tests.tinyws import OVERRIDES, ws  # noqa: F401  (the fixture)

SMALL = [*OVERRIDES, "distill.student={hidden: 16, depth: 2}",
         "evaluate.grid=[{models: students, solver: euler}]", "evaluate.reconstruction.n=50",
         "quantize.int4.backend=dequant"]


def test_a_smaller_student_trains_quantizes_and_evaluates(ws):  # noqa: F811
    for stage in ("couple", "reflow", "distill", "quantize", "evaluate"):
        run_stage(stage, ws / "params.yaml", SMALL, root=ws)
    teacher, tcard = load_model(ws / "models" / "rf2")
    student, card = load_model(ws / "models" / "distilled")
    assert card["arch"]["hidden"] == 16 and card["meta"]["init"] == "random"
    assert count_params(student) * 4 <= count_params(teacher)  # SlimFlow's point: a fraction of the size
    rows = {r["model"]: r for r in json.loads((ws / "metrics" / "eval.json").read_text())["rows"]}
    assert set(rows) == {"distilled", "distilled-int8", "distilled-int4", "distilled-bf16"}
    assert rows["distilled"]["params"] == count_params(student)
    assert all(r["latency_b1_ms"] > 0 and r["bytes"] > 0 for r in rows.values())
    for v in ("int8", "int4", "bf16"):
        q, qcard = load_model(ws / "models" / f"distilled-{v}")
        assert qcard["arch"] == card["arch"]
    assert (ws / "plots" / "pareto.png").stat().st_size > 1000


def test_the_teachers_architecture_still_starts_from_its_weights(ws):  # noqa: F811
    fast = [*OVERRIDES, "reflow.steps=1", "reflow.checkpoint_every=1", "couple.reflowed.n_pairs=400",
            "distill.steps=1", "distill.checkpoint_every=1"]
    for stage in ("couple", "reflow", "distill"):
        run_stage(stage, ws / "params.yaml", fast, root=ws)
    card = json.loads((ws / "models" / "distilled.json").read_text())
    assert card["meta"]["init"] == "teacher"
    assert card["arch"] == json.loads((ws / "models" / "rf2.json").read_text())["arch"]


def test_meanflow_and_slimflow_students_through_the_stages(ws):  # noqa: F811
    """distill.method meanflow (an average-velocity card, sampled by its interval) and slimflow
    (annealing reflow, then distillation), small and random; quantize and evaluate read both."""
    import torch

    from rectflow.solvers import solve

    base = [*SMALL, "distill.steps=30", "distill.checkpoint_every=1000"]
    for stage in ("couple", "reflow"):
        run_stage(stage, ws / "params.yaml", base, root=ws)
    rec = run_stage("distill", ws / "params.yaml", [*base, "distill.method=meanflow"], root=ws)
    card = json.loads((ws / "models" / "distilled.json").read_text())
    assert card["arch"]["average"] is True and card["meta"]["method"] == "meanflow" and card["meta"]["init"] == "random"
    assert rec["students"][0]["method"] == "meanflow" and rec["students"][0]["steps_run"] == 30
    model, _ = load_model(ws / "models" / "distilled")
    z = torch.randn(8, 2)
    with torch.no_grad():
        one = solve(model, z, "euler", 1)
        torch.testing.assert_close(one.x, z + model(z, torch.zeros(8), torch.ones(8)))
    every = [*base, "distill.method=meanflow", "quantize.variants=[int8, int4, bf16, fp8]"]
    qrec = run_stage("quantize", ws / "params.yaml", every, root=ws)
    fp8 = next(r for r in qrec["models"] if r["model"] == "distilled-fp8")
    assert fp8["backend"] == "emulated" and "cpu has no FP8 matmul" in fp8["why"]  # this machine: no GPU
    run_stage("evaluate", ws / "params.yaml", every, root=ws)
    for v in ("int8", "int4", "bf16", "fp8"):
        q, qcard = load_model(ws / "models" / f"distilled-{v}")
        assert qcard["arch"]["average"] is True and getattr(q, "average_velocity", False)
    rows = {r["model"] for r in json.loads((ws / "metrics" / "eval.json").read_text())["rows"]}
    assert {"distilled", "distilled-fp8", "distilled-int4"} <= rows

    slim = [*base, "distill.method=slimflow", "distill.slimflow.reflow_steps=20"]
    rec = run_stage("distill", ws / "params.yaml", slim, root=ws)
    s = rec["students"][0]
    assert s["method"] == "slimflow" and s["steps_run"] == 50  # 20 annealing reflow + 30 distillation
    card = json.loads((ws / "models" / "distilled.json").read_text())
    assert "average" not in card["arch"] and card["meta"]["init"] == "random"
    hist = (ws / "plots" / "train" / "distilled.csv").read_text().splitlines()
    assert hist[0].startswith("step,loss") and len(hist) > 1


def test_a_unet_student_for_vectors_is_refused_naming_the_key(ws):  # noqa: F811
    import pytest

    from rectflow.config import ParamsError

    with pytest.raises(ParamsError, match=r"distill\.student\.kind: 'unet' needs \(c, h, w\) data"):
        run_stage("distill", ws / "params.yaml", [*OVERRIDES, "distill.student={kind: unet}"], root=ws)
