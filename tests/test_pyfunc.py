"""The MLflow pyfunc of the one-step model, logged as the registry logs it: it generates with the
student, and inverts and regenerates with the flow logged beside it (issue 18)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rectflow.models import load_model
from rectflow.solvers import invert, solve
from tests.tinyws import ws  # noqa: F401 (a fixture)


@pytest.mark.timeout(300)
def test_the_logged_model_generates_inverts_and_regenerates(ws: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    import mlflow

    from flows.registry import log_onestep
    from flows.tracking import download_model

    for suffix in (".safetensors", ".json"):  # rf1's weights as a one-step student
        shutil.copy(ws / "models" / f"rf1{suffix}", ws / "models" / f"distilled{suffix}")
    card = json.loads((ws / "models/distilled.json").read_text())
    card["meta"] |= {"role": "student", "steps": 1}
    (ws / "models/distilled.json").write_text(json.dumps(card))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("pyfunc")
    with mlflow.start_run():
        info = log_onestep(ws / "models/distilled", ws / "models/rf1", "onestep-test")
    model = mlflow.pyfunc.load_model("models:/onestep-test/1")
    assert {p.name for p in model.metadata.get_params_schema().params} == {"direction", "solver", "steps", "label", "guidance"}
    flow, _ = load_model(ws / "models/rf1")
    g = torch.Generator().manual_seed(0)
    z0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g)
    with torch.inference_mode():
        np.testing.assert_allclose(model.predict(z0.numpy()), solve(flow, z0, "euler", 1).x.numpy(), atol=1e-6)
        x0 = model.predict(x1.numpy(), params={"direction": "invert", "solver": "midpoint", "steps": 4})
        np.testing.assert_allclose(x0, invert(flow, x1, "midpoint", 4).x.numpy(), atol=1e-6)
        back = model.predict(x0, params={"direction": "flow", "solver": "midpoint", "steps": 4})
        np.testing.assert_allclose(back, solve(flow, torch.from_numpy(x0), "midpoint", 4).x.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="params.direction: unknown 'sideways'"):
        model.predict(x1.numpy(), params={"direction": "sideways"})
    # `rectflow sample --model models:/…` still gets the student, not the flow logged beside it
    assert download_model("models:/onestep-test/1", uri).name == "distilled"
    assert info.registered_model_version == 1
