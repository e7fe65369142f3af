"""Model registry: register the one-step model as ``rectflow-onestep`` and move ``champion`` only on merit.

A new version takes the alias ``champion`` only when its W2 at its own step count beats the current
champion's *re-measured on this run's data and noise seeds* (so the comparison is always like for
like); otherwise it gets ``challenger``. A model whose weights equal the champion's (an unchanged
rerun) is not registered again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rectflow.layout import Layout
from rectflow.nets import read_model_card


def _alias(client, name: str, alias: str):  # type: ignore[no-untyped-def]
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:
        return None


def _evaluated_w2(layout: Layout, steps: int) -> float | None:
    """The distilled model's W2 at its own step count as the evaluate stage measured it
    (``metrics/eval.json``): the same noise, data and solver as :func:`tasks.evaluate.score_one_step`."""
    import json

    try:
        rows = json.loads((layout.metrics / "eval.json").read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for r in rows:
        if (r.get("model"), r.get("solver"), r.get("schedule", "uniform"), r.get("nfe")) == ("distilled", "euler", "uniform", steps):
            return float(r["w2"])
    return None


def promote(tracker, root: Path, parent_run_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    import mlflow

    from flows.tracking import download_model
    from tasks.evaluate import score_one_step

    p, client = tracker.p, tracker.client
    name = p.tracking.registered_model
    layout = Layout(root)
    stem = layout.model("distilled")
    card = read_model_card(stem)
    sha = card["meta"]["sha256"]
    score = _evaluated_w2(layout, int(card["meta"].get("steps", 1)))
    if score is None:
        score = score_one_step(p, layout, stem)
    champion = _alias(client, name, "champion")
    if champion is not None and champion.tags.get("sha256") == sha:
        return {"decision": "unchanged", "version": champion.version, "w2": score,
                "detail": f"weights equal champion v{champion.version}"}
    mlflow.set_tracking_uri(tracker.uri)
    with mlflow.start_run(run_id=parent_run_id):
        info = mlflow.pyfunc.log_model(
            name="onestep",
            python_model=str(Path(__file__).with_name("onestep_model.py")),
            artifacts={"weights": str(stem.with_suffix(".safetensors")), "card": str(stem.with_suffix(".json"))},
            pip_requirements=["rectflow"],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    tags = {"sha256": sha, "w2": f"{score:.6f}", "seed": str(p.seed), "data.target": p.data.target,
            "data.source": p.data.source, "mlflow.parent_run_id": parent_run_id}
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)
    if champion is None:
        client.set_registered_model_alias(name, "champion", version)
        return {"decision": "champion", "version": version, "w2": score, "detail": "first version"}
    champ_stem = download_model(f"models:/{name}@champion", tracker.uri)
    champ_score = score_one_step(p, layout, champ_stem)
    if champ_score is not None and score < champ_score:
        client.set_registered_model_alias(name, "champion", version)
        return {"decision": "champion", "version": version, "w2": score, "previous_w2": champ_score,
                "detail": f"W2 {score:.4f} < champion v{champion.version}'s {champ_score:.4f} on the same data and seeds"}
    client.set_registered_model_alias(name, "challenger", version)
    why = "not comparable (other data shape)" if champ_score is None else f"{champ_score:.4f} ≤ {score:.4f}"
    return {"decision": "challenger", "version": version, "w2": score, "previous_w2": champ_score,
            "detail": f"champion v{champion.version} kept: {why}"}
