"""params.yaml loading: typos and bad values are one-line errors naming the key."""

from __future__ import annotations

import pytest

from rectflow.config import Params, ParamsError, apply_overrides, load_params, validate


def test_repository_params_equal_the_schema_defaults(root):
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
