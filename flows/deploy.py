"""The deployment ``rectflow-pipeline/nightly``: the pipeline flow served with its cron schedule.

``rectflow serve`` runs this on a Prefect server (``PREFECT_API_URL``): the schedule comes from
``params.yaml`` (``schedule.cron``, ``schedule.timezone``), the UI form's defaults from its other
sections, at most one run at a time (DVC's workspace allows no two), and stage tasks retry
transient failures.
"""

from __future__ import annotations

from pathlib import Path

from rectflow.config import Params, dump_params

DEPLOYMENT = "nightly"


def serve(p: Params, params_path: Path = Path("params.yaml")) -> None:
    from prefect.schedules import Cron

    from flows.pipeline import pipeline

    pipeline.serve(
        name=DEPLOYMENT,
        schedules=[Cron(p.schedule.cron, timezone=p.schedule.timezone)],
        parameters={"params": dump_params(p)},
        global_limit=1,
        limit=1,
        tags=["rectflow"],
        description=f"Nightly rectified-flow retraining on {Path(params_path).resolve()}",
        pause_on_shutdown=False,
    )
