"""Quantized variants of a model, with the same interface (``v(x, t)``) as the fp32 one.

On disk a quantized model is still ``NAME.safetensors`` + ``NAME.json``:

- ``int8``: every ``nn.Linear`` weight stored as per-output-channel symmetric int8
  (``W ≈ q · s``, ``q = round(W / s)``, ``s = max|W_row| / 127``) plus its float32 scales; all other
  tensors in float32. At load time the int8 weights are handed to a compute backend:
  ``torchao`` (weight-only int8, ``Int8WeightOnlyConfig``; the maintained PyTorch path) or
  ``dynamic`` (``torch.ao.quantization.quantize_dynamic``, deprecated, int8 activations too).
  Convolutions (U-Net) stay in float32 weights dequantized from int8 storage.
- ``bf16``: every floating tensor stored and computed in bfloat16 (native on AVX-512-bf16 CPUs and
  on recent GPUs; float16 is emulated on CPUs and much slower).

:func:`quantize_int8` picks the backend by measuring both on the target batch size when
``backend="auto"`` and records the choice in ``meta``.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.nets import build_model, check_state, load_state

__all__ = ["dequantize_state", "int8_state", "load_quantized", "apply_backend", "pick_backend"]


def _linear_weight_keys(model: nn.Module) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def int8_state(model: nn.Module) -> dict[str, Tensor]:
    """Per-channel symmetric int8 of every Linear/Conv weight (``KEY.q`` int8, ``KEY.scale`` fp32)."""
    keys = _linear_weight_keys(model)
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        if k in keys:
            w = v.detach().float()
            s = w.flatten(1).abs().amax(1).clamp_min(1e-12) / 127.0
            q = torch.round(w / s.view(-1, *([1] * (w.ndim - 1)))).clamp(-127, 127).to(torch.int8)
            out[f"{k}.q"], out[f"{k}.scale"] = q, s
        else:
            out[k] = v.detach().float()
    return out


def dequantize_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k.endswith(".q"):
            base = k[:-2]
            s = state[f"{base}.scale"]
            out[base] = v.float() * s.view(-1, *([1] * (v.ndim - 1)))
        elif not k.endswith(".scale"):
            out[k] = v.float()
    return out


def apply_backend(model: nn.Module, backend: str) -> nn.Module:
    """Return ``model`` with its Linear layers running int8 through ``backend``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backend == "torchao":
            import logging

            logging.getLogger("torchao").setLevel(logging.ERROR)
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            m = copy.deepcopy(model)
            quantize_(m, Int8WeightOnlyConfig())
            return m
        if backend == "dynamic":
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    raise ValueError(f"quantize.backend: unknown {backend!r}; expected 'torchao' or 'dynamic'")


def _time(model: nn.Module, x: Tensor, t: Tensor, repeats: int = 5) -> float:
    with torch.inference_mode():
        model(x, t)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x, t)
            best = min(best, time.perf_counter() - t0)
    return best


def pick_backend(model: nn.Module, shape: tuple[int, ...], batch: int) -> tuple[str, dict[str, float]]:
    """Measure each available int8 backend at ``batch``; return the fastest and all timings (ms)."""
    x = torch.randn(batch, *shape)
    t = torch.zeros(batch)
    timings: dict[str, float] = {}
    for name in ("torchao", "dynamic"):
        try:
            timings[name] = 1000 * _time(apply_backend(model, name), x, t)
        except Exception:  # backend not installed or unsupported on this build
            continue
    if not timings:
        raise RuntimeError("no int8 backend works on this torch build (tried torchao, dynamic)")
    return min(timings, key=timings.__getitem__), timings


def load_quantized(stem: Path, card: dict[str, Any], device: torch.device | str) -> nn.Module:
    """Rebuild a quantized model written by the quantize stage."""
    quant = card["meta"]["quant"]
    model = build_model(card["arch"])
    state = load_state(stem)
    where = Path(stem).with_suffix(".safetensors")
    if quant == "bf16":
        check_state(model, state, where)
        model.load_state_dict({k: v.float() for k, v in state.items()})
        return _BF16(model.to(torch.bfloat16).to(device).eval())
    if quant == "int8":
        deq = dequantize_state(state)
        check_state(model, deq, where)
        model.load_state_dict(deq)
        model.eval()
        if torch.device(device).type != "cpu":
            return model.to(device)  # int8 CPU kernels; on GPU run the dequantized weights
        return apply_backend(model, card["meta"].get("backend", "torchao"))
    raise ValueError(f"{Path(stem).with_suffix('.json')}: unknown quantization {quant!r}")


class _BF16(nn.Module):
    """Runs a bf16 model behind the fp32 interface: inputs cast in, outputs cast back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.inner(x.to(torch.bfloat16), t.to(torch.bfloat16)).to(x.dtype)
