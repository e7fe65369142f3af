"""Stage 6, quantize: int8 and bf16 variants of the distilled one-step model.

Both keep the fp32 model's interface (``v(x, t)``) and files (``models/distilled-int8``,
``models/distilled-bf16``). The int8 compute backend is chosen by measuring the candidates at the
evaluation batch size (``quantize.backend: auto``) and recorded beside the weights. Quality, latency
and size are compared side by side in the evaluate stage, at equal noise seeds.
"""

from __future__ import annotations

import torch

from rectflow.config import Params
from rectflow.layout import Layout
from rectflow.nets import read_model_card, save_model
from rectflow.models import load_model
from rectflow.quant import int8_state, pick_backend
from rectflow.stages import student_names


def run(p: Params, layout: Layout) -> dict:
    out: dict = {"models": []}
    for student, k in student_names(p.distill.k):
        model, card = load_model(layout.model(student), "cpu")
        shape = tuple(card["arch"]["shape"])
        base = {"role": "student", "steps": k, "parent": student}
        fp32_bytes = layout.model(student).with_suffix(".safetensors").stat().st_size
        z = torch.randn(p.evaluate.latency_batch, *shape, generator=torch.Generator().manual_seed(p.seed))
        t = torch.zeros(len(z))
        with torch.inference_mode():
            ref = model(z, t)
        if p.quantize.int8:
            if p.quantize.backend == "auto":
                backend, timings = pick_backend(model, shape, p.evaluate.latency_batch)
            else:
                backend, timings = p.quantize.backend, {}
            name = f"{student}-int8"
            save_model(layout.model(name), int8_state(model), card["arch"],
                       base | {"name": name, "quant": "int8", "backend": backend, "backend_ms": timings})
            out["models"].append(_compare(layout, name, fp32_bytes, z, t, ref) | {"backend": backend, "backend_ms": timings})
        if p.quantize.half:
            name = f"{student}-bf16"
            state = {k_: v.to(torch.bfloat16) if v.is_floating_point() else v for k_, v in model.state_dict().items()}
            save_model(layout.model(name), state, card["arch"], base | {"name": name, "quant": "bf16"})
            out["models"].append(_compare(layout, name, fp32_bytes, z, t, ref))
    return out


def _compare(layout: Layout, name: str, fp32_bytes: int, z: torch.Tensor, t: torch.Tensor, ref: torch.Tensor) -> dict:
    model, _ = load_model(layout.model(name), "cpu")
    with torch.inference_mode():
        diff = (model(z, t).float() - ref).abs().max().item()
    size = layout.model(name).with_suffix(".safetensors").stat().st_size
    return {"model": name, "bytes": size, "fp32_bytes": fp32_bytes, "max_abs_velocity_change": diff,
            "sha256": read_model_card(layout.model(name))["meta"]["sha256"]}
