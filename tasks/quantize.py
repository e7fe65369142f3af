"""Stage 6, quantize: the variants of every student named in ``quantize.variants``.

- ``int8``: per-output-channel int8 weights; its compute backend (torchao or torch.ao dynamic) is
  measured at the evaluation batch size (``quantize.backend: auto``).
- ``int4``: group-wise 4-bit weights with AWQ's activation-aware scales, searched on
  ``quantize.int4.calibration`` draws of the student's source at its time inputs; the Linear path
  (x86 int4 kernel or dequantized at load) is measured the same way (``quantize.int4.backend``).
- ``bf16``: every floating tensor in bfloat16.

Every variant keeps the fp32 model's interface (``v(x, t)``) and files (``models/STUDENT-VARIANT``),
and records its choice of backend and the timings beside the weights. Quality, latency and size are
compared side by side in the evaluate stage, at equal noise seeds.
"""

from __future__ import annotations

import torch

from rectflow.config import Params
from rectflow.data import load_prepared
from rectflow.layout import Layout
from rectflow.models import load_model
from rectflow.nets import read_model_card, save_model
from rectflow.quant import int4_state, int8_state, pick_backend, pick_int4_backend
from rectflow.stages import student_names

CALIBRATION_SEED_OFFSET = 20_011  # the AWQ draws are neither the training nor the evaluation ones


def calibration_draws(p: Params, layout: Layout, n: int, shape: tuple[int, ...], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, t)`` for the AWQ search: ``n`` source draws (N(0, I), or rows of the source's training
    split) at t = 0 for a one-step student; a k-step student's inputs are spread over its k times."""
    g = torch.Generator().manual_seed(p.seed + CALIBRATION_SEED_OFFSET)
    x = load_prepared(layout.prepared, "source", "train").sample(n, g).reshape(n, *shape)
    t = (torch.arange(n) % steps).float() / steps
    return x, t


def run(p: Params, layout: Layout) -> dict:
    out: dict = {"models": []}
    q = p.quantize
    for student, k in student_names(p.distill.k):
        model, card = load_model(layout.model(student), "cpu")
        shape = tuple(card["arch"]["shape"])
        base = {"role": "student", "steps": k, "parent": student}
        fp32_bytes = layout.model(student).with_suffix(".safetensors").stat().st_size
        z = torch.randn(p.evaluate.latency_batch, *shape, generator=torch.Generator().manual_seed(p.seed))
        t = torch.zeros(len(z))
        with torch.inference_mode():
            ref = model(z, t)
        for variant in q.variants:
            name = f"{student}-{variant}"
            meta = base | {"name": name, "quant": variant}
            extra: dict = {}
            if variant == "int8":
                if q.backend == "auto":
                    backend, timings = pick_backend(model, shape, p.evaluate.latency_batch)
                else:
                    backend, timings = q.backend, {}
                save_model(layout.model(name), int8_state(model), card["arch"],
                           meta | {"backend": backend, "backend_ms": timings})
                extra = {"backend": backend, "backend_ms": timings}
            elif variant == "int4":
                calib = calibration_draws(p, layout, q.int4.calibration, shape, k) if q.int4.awq else None
                state, report = int4_state(model, q.int4.group_size, calib)
                meta |= {"group_size": q.int4.group_size, "awq": q.int4.awq, "calibration": q.int4.calibration}
                if q.int4.backend == "auto":
                    backend, timings = pick_int4_backend(card | {"meta": meta}, state, p.evaluate.latency_batch)
                else:
                    backend, timings = q.int4.backend, {}
                save_model(layout.model(name), state, card["arch"],
                           meta | {"backend": backend, "backend_ms": timings, "awq_layers": report})
                extra = {"backend": backend, "backend_ms": timings,
                         "awq_alpha": {n: r["alpha"] for n, r in report.items()}}
            else:
                state = {k_: v.to(torch.bfloat16) if v.is_floating_point() else v for k_, v in model.state_dict().items()}
                save_model(layout.model(name), state, card["arch"], meta)
            out["models"].append(_compare(layout, name, fp32_bytes, z, t, ref) | extra)
    return out


def _compare(layout: Layout, name: str, fp32_bytes: int, z: torch.Tensor, t: torch.Tensor, ref: torch.Tensor) -> dict:
    model, _ = load_model(layout.model(name), "cpu")
    with torch.inference_mode():
        diff = (model(z, t).float() - ref).abs().max().item()
    size = layout.model(name).with_suffix(".safetensors").stat().st_size
    return {"model": name, "bytes": size, "fp32_bytes": fp32_bytes, "bytes_ratio": size / fp32_bytes,
            "max_abs_velocity_change": diff, "sha256": read_model_card(layout.model(name))["meta"]["sha256"]}
