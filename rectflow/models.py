"""Loading any saved model, float or quantized, through one function (:func:`load_model`).

Float networks are rebuilt by :mod:`rectflow.nets`, quantized variants (``meta.quant`` set in the
card) by :mod:`rectflow.quant`; this module sits above both so that neither imports the other back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rectflow.nets import ModelError, build_model, check_state, load_state, read_model_card
from rectflow.quant import load_quantized

__all__ = ["load_model"]


def load_model(stem: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild ``stem`` from its JSON and load its safetensors weights (strict, shape-checked).

    Quantized variants (``meta.quant`` set) are rebuilt by :mod:`rectflow.quant`.
    Returns ``(module in eval mode, card)``.
    """
    card = read_model_card(stem)
    quant = card.get("meta", {}).get("quant")
    if quant:
        return load_quantized(Path(stem), card, device), card
    try:
        model = build_model(card["arch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{Path(stem).with_suffix('.json')}: architecture incomplete or invalid "
                         f"({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    state = load_state(stem)
    check_state(model, state, Path(stem).with_suffix(".safetensors"))
    model.load_state_dict(state)
    return model.to(device).eval(), card
