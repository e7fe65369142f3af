"""MLflow "model from code" for a rectflow one-step generator (no pickle anywhere).

The logged model carries ``weights`` (safetensors) and ``card`` (architecture JSON) as artifacts;
``predict(Z0)`` returns ``Z1 = Z0 + v(Z0, 0)`` for noise ``Z0`` of shape ``(n, *shape)`` or ``(n, D)``.
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np


class OneStepGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:  # type: ignore[no-untyped-def]
        from pathlib import Path

        from rectflow.models import load_model

        self.model, self.card = load_model(Path(context.artifacts["weights"]).with_suffix(""))
        self.shape = tuple(self.card["arch"]["shape"])

    # The np.ndarray hint tells MLflow its input needs no type-hint validation (the logged signature
    # describes it), so it does not warn about a missing hint.
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # type: ignore[no-untyped-def]
        import torch

        from rectflow.solvers import solve

        z0 = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, *self.shape)
        steps = int(self.card["meta"].get("steps", 1))
        with torch.inference_mode():
            x = solve(self.model, z0, "euler", steps).x
        return x.reshape(len(x), -1).numpy()


mlflow.models.set_model(OneStepGenerator())
