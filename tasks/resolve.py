"""Stage 0, resolve: the params every later stage runs with, written once as ``params.resolved.yaml``.

``params.yaml`` over its profile over the built-in defaults (:mod:`rectflow.params`); DVC tracks the
whole of ``params.yaml`` here and each later stage's own keys in the resolved file, so a profile or
default that changes reruns exactly the stages that read it. It also refuses a ``dvc.yaml`` that
does not match these params (``reflow.rounds: 2`` needs rf3 and round 3 declared): run
``rectflow dvc-yaml``.
"""

from __future__ import annotations

from rectflow.config import Params, ParamsError
from rectflow.dvcyaml import stale_stages
from rectflow.layout import Layout
from rectflow.params import RESOLVED_FILE, digest_params, write_resolved_params


def run(p: Params, layout: Layout) -> dict:
    if (layout.root / "dvc.yaml").is_file():
        stale = stale_stages(p, layout.root)
        if stale:
            raise ParamsError(f"dvc.yaml: out of date for these params (stage {stale[0]}"
                              f"{f' and {len(stale) - 1} more' if len(stale) > 1 else ''}); run `rectflow dvc-yaml`")
    path = write_resolved_params(p, layout.root)
    return {"resolved": RESOLVED_FILE if path.parent == layout.root else str(path), "profile": p.profile,
            "sha256": digest_params(p)}
