"""A student of its own architecture (issue #17, ``distill.student``): smaller, randomly initialised,
and everything downstream (quantize, evaluate, sample) reads its card."""

from __future__ import annotations

import json

from rectflow.models import load_model
from rectflow.nets import count_params
from tasks.runner import run_stage
from tests.tinyws import OVERRIDES, ROOT, ws  # noqa: F401  (the fixture)

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


class _Linear(__import__("torch").nn.Module):
    """v(x, t) = A·x + b·t + c: a constructed one-step "model" whose output is known in closed form."""

    def __init__(self) -> None:
        import torch

        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = torch.nn.Parameter(torch.randn(2, 2, generator=g))
        self.b = torch.nn.Parameter(torch.randn(2, generator=g))
        self.c = torch.nn.Parameter(torch.randn(2, generator=g))

    def forward(self, x, t):  # noqa: ANN001, ANN201
        return x @ self.a.T + t[:, None] * self.b + self.c


def test_teacher_pairs_target_the_one_step_output_on_fresh_noise_and_resume():
    """TeacherPairs: x1 = x0 + v(x0, 0) exactly (one Euler step, no gradient), fresh x0 every batch,
    seeded, and a restored state gives the same next batch bit for bit."""
    import torch

    from rectflow.data import Distribution
    from rectflow.sources import TeacherPairs

    net = _Linear()
    pairs = TeacherPairs(Distribution((2,)), net, (2,), seed=5)
    x0, x1 = pairs.next_batch(64)
    assert x0.shape == x1.shape == (64, 2) and not x1.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(x1, x0 + x0 @ net.a.T + net.c)
    state = pairs.state_dict()
    y0, y1 = pairs.next_batch(64)
    assert not torch.equal(y0, x0)  # fresh noise, never a fixed set
    again = TeacherPairs(Distribution((2,)), net, (2,), seed=5)
    again.load_state_dict(state)
    z0, z1 = again.next_batch(64)
    assert torch.equal(z0, y0) and torch.equal(z1, y1)
    bf = TeacherPairs(Distribution((2,)), net, (2,), seed=5, precision="bf16").next_batch(64)[1]
    assert bf.dtype == torch.float32 and torch.allclose(bf, x1, atol=0.1)  # bf16 forward, fp32 targets


def test_online_distillation_of_a_one_step_student_into_a_small_one(ws):  # noqa: F811
    """distill.teacher_model: the small student learns the teacher-size student's one-step map on fresh
    noise; its card names that model and its sha256; DVC tracks the model's files; a flow, a missing
    file or another method are refused with one line naming the key."""
    import shutil

    import pytest
    import torch

    from rectflow.config import ParamsError
    from rectflow.dvcyaml import generate
    from rectflow.nets import ModelError
    from rectflow.params import load_params
    from rectflow.solvers import solve

    fast = [*OVERRIDES, "reflow.steps=30", "reflow.checkpoint_every=1000", "couple.reflowed.n_pairs=400",
            "distill.steps=200", "distill.checkpoint_every=1000"]
    for stage in ("couple", "reflow", "distill"):
        run_stage(stage, ws / "params.yaml", fast, root=ws)
    (ws / "teachers").mkdir()
    for suffix in (".json", ".safetensors"):
        shutil.copy2((ws / "models" / "distilled").with_suffix(suffix), (ws / "teachers" / "big").with_suffix(suffix))
    big, big_card = load_model(ws / "teachers" / "big")
    online = [*fast, "distill.student={hidden: 16, depth: 2}", "distill.lr=0.003", "distill.steps=300"]
    rec = run_stage("distill", ws / "params.yaml", [*online, "distill.teacher_model=teachers/big"], root=ws)
    card = json.loads((ws / "models" / "distilled.json").read_text())
    assert card["meta"]["teacher_model"] == "teachers/big" and "pairs_round" not in card["meta"]
    assert card["meta"]["teacher_sha256"] == big_card["meta"]["sha256"] and card["meta"]["init"] == "random"
    assert rec["students"][0]["steps_run"] == 300
    small, _ = load_model(ws / "models" / "distilled")
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = solve(big, z, "euler", 1).x
        err = (solve(small, z, "euler", 1).x - want).pow(2).mean()
    assert err < 0.05 * want.var(0).sum(), err  # it learnt the teacher's map, not noise

    p = load_params(ws / "params.yaml", [*online, "distill.teacher_model=teachers/big"])
    deps = generate(p, ROOT)["stages"]["distill"]["deps"]
    assert {"teachers/big.json", "teachers/big.safetensors"} <= set(deps)

    with pytest.raises(ModelError, match=r"distill\.teacher_model: .*expected a one-step student"):
        run_stage("distill", ws / "params.yaml", [*online, "distill.teacher_model=models/rf2"], root=ws)
    with pytest.raises(ModelError, match=r"distill\.teacher_model: .* is what this stage writes"):
        run_stage("distill", ws / "params.yaml", [*online, "distill.teacher_model=models/distilled"], root=ws)
    with pytest.raises(ModelError, match=r"nowhere"):
        run_stage("distill", ws / "params.yaml", [*online, "distill.teacher_model=nowhere/big"], root=ws)
    with pytest.raises(ParamsError, match=r"distill\.teacher_model: online distillation is for distill\.method"):
        load_params(ws / "params.yaml", [*online, "distill.teacher_model=teachers/big", "distill.method=slimflow"])
    with pytest.raises(ParamsError, match=r"distill\.teacher_model: expected a model stem"):
        load_params(ws / "params.yaml", [*online, "distill.teacher_model=teachers/big.safetensors"])
