"""Stage 6, quantize: the variants of every student named in ``quantize.variants``.

- ``int8``: per-output-channel int8 weights; its compute backend (torchao or torch.ao dynamic) is
  measured at the evaluation batch size (``quantize.backend: auto``).
- ``int4``: group-wise 4-bit weights with AWQ's activation-aware scales, searched on
  ``quantize.int4.calibration`` draws of the student's source at its time inputs; the Linear path
  (x86 int4 kernel or dequantized at load) is measured the same way (``quantize.int4.backend``).
- ``bf16``: every floating tensor in bfloat16.
- ``fp8``: E4M3 weights and activations (:mod:`rectflow.fp8`): the native FP8 matmul on GPUs of
  compute capability ≥ 8.9, emulated in fp32 elsewhere (a line says so; the record says why).

Every variant keeps the fp32 model's interface (``v(x, t)``) and files (``models/STUDENT-VARIANT``),
and records its choice of backend and the timings beside the weights. Quality, latency and size are
compared side by side in the evaluate stage, at equal noise seeds.
"""

from __future__ import annotations

import sys

import torch

from rectflow.config import Params
from rectflow.data import load_prepared
from rectflow.layout import Layout
from rectflow.models import load_model
from rectflow.nets import read_model_card, save_model
from rectflow.fp8 import fp8_native, fp8_state
from rectflow.quant import int4_state, int8_state, pick_backend, pick_int4_backend
from rectflow.solvers import solve
from rectflow.stages import student_names
from tasks._common import device

CALIBRATION_SEED_OFFSET = 20_011  # the AWQ draws are neither the training nor the evaluation ones


def calibration_draws(p: Params, layout: Layout, n: int, shape: tuple[int, ...], steps: int,
                      model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The AWQ search's inputs, what the student meets when it samples: ``n`` source draws (N(0, I),
    or rows of the source's training split) at t = 0 for a one-step student; for a k-step one, draw j
    at its step j mod k, taken where the student's own Euler steps put it at t = (j mod k)/k.
    ``(x, t)``, or ``(x, t, t + 1/k)`` for an average-velocity student (MeanFlow)."""
    g = torch.Generator().manual_seed(p.seed + CALIBRATION_SEED_OFFSET)
    x = load_prepared(layout.prepared, "source", "train").sample(n, g).reshape(n, *shape)
    step = torch.arange(n) % steps
    if steps > 1:
        from rectflow.guidance import Guided

        v = Guided(model, cond["y"], 1.0) if (cond := conditioning(model, n)) else model
        with torch.inference_mode():
            traj = solve(v, x, "euler", steps, trajectory=True).trajectory  # (k + 1, n, *shape)
        x = traj[step, torch.arange(n)].clone()  # type: ignore[index]
    t = step.float() / steps
    out = (x, t, t + 1.0 / steps) if getattr(model, "average_velocity", False) else (x, t)
    return (*out, cond) if (cond := conditioning(model, n)) else out


def conditioning(model: torch.nn.Module, n: int) -> dict[str, torch.Tensor]:
    """A conditional student's labels for ``n`` draws (class i mod K: the student is used with
    labels, its null class was never trained by distillation), as keyword inputs; {} otherwise."""
    classes = int(getattr(model, "classes", 0))
    return {"y": torch.arange(n) % classes} if classes else {}


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
        cond = conditioning(model, len(z))
        with torch.inference_mode():
            ref = model(z, t, **cond)
        for variant in q.variants:
            name = f"{student}-{variant}"
            meta = base | {"name": name, "quant": variant}
            extra: dict = {}
            if variant == "int8":
                errors: dict[str, float] = {}
                if q.backend == "auto":
                    backend, timings = pick_backend(model, shape, p.evaluate.latency_batch, errors)
                else:
                    backend, timings = q.backend, {}
                save_model(layout.model(name), int8_state(model), card["arch"],
                           meta | {"backend": backend, "backend_ms": timings, "backend_rel_mse": errors})
                extra = {"backend": backend, "backend_ms": timings, "backend_rel_mse": errors}
            elif variant == "int4":
                calib = calibration_draws(p, layout, q.int4.calibration, shape, k, model) if q.int4.awq else None
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
            elif variant == "fp8":
                native, why = fp8_native(device())
                backend = "scaled_mm" if native else "emulated"
                if not native:
                    print(f"[quantize] {name}: FP8 emulated in fp32 (its quality, not its speed): {why}",
                          file=sys.stderr, flush=True)
                save_model(layout.model(name), fp8_state(model), card["arch"], meta | {"backend": backend, "why": why})
                extra = {"backend": backend, "why": why}
            else:
                state = {k_: v.to(torch.bfloat16) if v.is_floating_point() else v for k_, v in model.state_dict().items()}
                save_model(layout.model(name), state, card["arch"], meta)
            out["models"].append(_compare(layout, name, fp32_bytes, z, t, ref) | extra)
    return out


def _compare(layout: Layout, name: str, fp32_bytes: int, z: torch.Tensor, t: torch.Tensor, ref: torch.Tensor) -> dict:
    model, _ = load_model(layout.model(name), "cpu")
    with torch.inference_mode():
        diff = (model(z, t, **conditioning(model, len(z))).float() - ref).abs().max().item()
    size = layout.model(name).with_suffix(".safetensors").stat().st_size
    return {"model": name, "bytes": size, "fp32_bytes": fp32_bytes, "bytes_ratio": size / fp32_bytes,
            "max_abs_velocity_change": diff, "sha256": read_model_card(layout.model(name))["meta"]["sha256"]}
