"""params.yaml loading: typos and bad values are one-line errors naming the key."""

from __future__ import annotations

import pytest

from rectflow.config import Params, ParamsError, validate
from rectflow.params import apply_overrides, load_params


def test_repository_params_resolve_to_the_schema_defaults(root):
    assert load_params(root / "params.yaml") == Params()


@pytest.mark.parametrize(
    "doc,needle",
    [
        ({"pretrain": {"stpes": 10}}, "pretrain.stpes: unknown key"),
        ({"pretrian": {}}, "pretrian: unknown key"),
        ({"pretrain": {"steps": -5}}, "pretrain.steps"),
        ({"couple": {"solver": "rk4"}}, "couple.solver"),
        ({"evaluate": {"grid": [{"models": "flows", "solver": "euler", "steps": [0]}]}}, "evaluate.grid.0.steps.0"),
        ({"data": {"target": "file"}}, "data.target_path"),
        ({"pretrain": {"lr": "fast"}}, "pretrain.lr"),
        ({"pretrain": {"lr": float("nan")}}, "pretrain.lr"),
        ({"seed": -1}, "seed"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_documents_name_the_key(doc, needle):
    with pytest.raises(ParamsError) as e:
        validate(doc, "params.yaml")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_overrides_are_yaml_typed_and_dotted():
    doc = apply_overrides({}, ["pretrain.steps=500", "couple.solver=euler", "evaluate.grid=[{models: flows, solver: heun, steps: [2]}]"])
    p = validate(doc)
    assert p.pretrain.steps == 500 and p.couple.solver == "euler"
    assert p.evaluate.grid[0].solver == "heun"


def test_override_errors():
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        apply_overrides({}, ["pretrain.steps"])
    with pytest.raises(ParamsError, match="pretrain.steps is not a section"):
        apply_overrides({"pretrain": {"steps": 3}}, ["pretrain.steps.x=1"])


def test_params_are_frozen():
    p = Params()
    with pytest.raises(Exception):
        p.pretrain.steps = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "doc,needle",
    [
        ({"couple": {"schedule": "bellman"}}, "couple.schedule: 'bellman' needs a fixed-step solver"),  # rk45 default
        ({"couple": {"schedule": "bellman", "solver": "rk45"}}, "couple.schedule"),
        ({"couple": {"schedule": "boss"}}, "couple.schedule"),
        ({"evaluate": {"grid": [{"models": "flows", "solver": "rk45", "schedule": "bellman"}]}},
         "evaluate.grid.0: Value error, schedule: 'bellman' needs a fixed-step solver"),
        ({"evaluate": {"grid": [{"models": "flows", "solver": "euler", "schedule": "bellman"}]}}, "explicit steps"),
        ({"evaluate": {"grid": [{"models": "students", "solver": "euler", "steps": [1], "schedule": "bellman"}]}},
         "flows only"),
        ({"couple": {"schedule": "bellman", "solver": "euler", "steps": 101}}, "couple.steps: 101 > bellman.grid_points"),
        ({"evaluate": {"grid": [{"models": "flows", "solver": "euler", "steps": [2, 50], "schedule": "bellman"}]},
          "bellman": {"grid_points": 20}}, "evaluate.grid.0.steps: 50 > bellman.grid_points (20)"),
        ({"bellman": {"grid_points": 1}}, "bellman.grid_points"),
        ({"bellman": {"n_samples": 0}}, "bellman.n_samples"),
        ({"bellman": {"samples": 10}}, "bellman.samples: unknown key"),
        ({"couple": {"reflowed": {"schedule": "bellman"}}}, "couple.reflowed.schedule: 'bellman' needs a fixed-step"),
        ({"couple": {"solver": "euler", "reflowed": {"schedule": "bellman", "steps": 200}}},
         "couple.reflowed: 200 steps > bellman.grid_points (100)"),
        ({"couple": {"reflowed": {"stpes": 8}}}, "couple.reflowed.stpes: unknown key"),
        ({"couple": {"reflowed": {"n_pairs": 0}}}, "couple.reflowed.n_pairs"),
    ],
)
def test_bellman_schedule_settings_are_checked(doc, needle):
    with pytest.raises(ParamsError) as e:
        validate(doc, "params.yaml")
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bellman_schedule_settings_accepted():
    p = validate({"couple": {"schedule": "bellman", "solver": "heun", "steps": 8},
                  "evaluate": {"grid": [{"models": ["rf2"], "solver": "midpoint", "steps": [3], "schedule": "bellman"}]}})
    assert p.couple.schedule == "bellman" and p.evaluate.grid[0].schedule == "bellman"
    assert Params().bellman.grid_points == 100 and Params().bellman.n_samples == 1024
    assert any(e.schedule == "bellman" and e.steps == [2, 4, 8] for e in Params().evaluate.grid)


def test_reflowed_rounds_take_their_own_couple_settings():
    p = validate({"couple": {"n_pairs": 100, "solver": "euler", "steps": 50,
                             "reflowed": {"n_pairs": 400, "steps": 8, "precision": "bf16", "schedule": "bellman"}}})
    assert p.couple.for_round(1) is p.couple
    r2 = p.couple.for_round(2)
    assert (r2.n_pairs, r2.solver, r2.steps, r2.precision, r2.schedule) == (400, "euler", 8, "bf16", "bellman")
    assert r2.shard_size == p.couple.shard_size and r2.reflowed == type(p.couple.reflowed)()
    assert Params().couple.for_round(3) == Params().couple  # all null: every round as round 1


def test_distill_pairs_round_within_the_rounds_made():
    """distill.pairs_round: null is the last round (the recipe); K ≤ reflow.rounds + 1; the rounds a run
    makes drop the last one when the students learn another (Params.coupled_rounds; the stage registry follows)."""
    from rectflow.stages import stage

    p = Params()
    assert p.distill.pairs_round is None and p.distill_round() == 2 and p.coupled_rounds() == [1, 2]
    one = validate({"distill": {"pairs_round": 1}})
    assert one.distill_round() == 1 and one.coupled_rounds() == [1]
    assert "data/couplings/round-2" not in [o.path for o in stage("reflow").outputs(one)]
    assert "data/couplings/round-2" in [o.path for o in stage("reflow").outputs(p)]
    assert "data/couplings/round-1" in stage("distill").inputs(one)
    three = validate({"reflow": {"rounds": 2}, "distill": {"pairs_round": 2}})
    assert three.coupled_rounds() == [1, 2] and three.distill_round() == 2
    with pytest.raises(ParamsError, match=r"distill.pairs_round: 3 > reflow.rounds \+ 1 \(2\)"):
        validate({"distill": {"pairs_round": 3}})
    with pytest.raises(ParamsError, match="distill.pairs_round"):
        validate({"distill": {"pairs_round": 0}})
