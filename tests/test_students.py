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
