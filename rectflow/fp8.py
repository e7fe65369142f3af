"""FP8 (E4M3) variants: 8-bit floating-point weights and activations (ZeroQuant-FP's W8A8-FP8).

On disk (``quant: fp8``), every ``nn.Linear`` and ``nn.Conv2d`` weight is ``KEY.f8``
(``float8_e4m3fn``, the weight's shape) with ``KEY.scale8`` (float32, one per output channel:
``s = max|W_row| / 448``, E4M3's largest finite value); every other tensor float32.

At run time each Linear quantizes its input per row (per sample, dynamically: ``a = max|x_row| / 448``)
to E4M3 and multiplies by the FP8 weight, through one of two backends:

- ``scaled_mm``: ``torch._scaled_mm`` with row-wise scales, the native FP8 tensor-core matmul of GPUs
  that have one (compute capability ≥ 8.9: Ada, Hopper; H100/H200), bf16 out;
- ``emulated``: the same numbers in float32 (the E4M3 values of the input and the weight, exactly
  represented, multiplied and accumulated in fp32): FP8's quality on any device, not its speed.
  Used wherever there is no FP8 matmul (every CPU), with a line saying so.

Convolutions keep FP8 storage and compute in float32 from the dequantized weight (no FP8
convolution kernel exists in PyTorch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.nets import build_model, check_shapes, weight_keys

__all__ = ["E4M3_MAX", "Fp8Linear", "build_fp8", "check_fp8_state", "fp8_native", "fp8_state", "quantize_e4m3"]

E4M3_MAX = 448.0
FP8 = torch.float8_e4m3fn
FP8_KEYS = (".f8", ".scale8")


def fp8_native(device: torch.device | str) -> tuple[bool, str]:
    """Whether ``device`` multiplies FP8 natively, and why not when it does not."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return False, f"{dev.type} has no FP8 matmul in PyTorch (only CUDA GPUs of compute capability ≥ 8.9)"
    cc = torch.cuda.get_device_capability(dev)
    if cc < (8, 9):
        return False, f"this GPU (compute capability {cc[0]}.{cc[1]}) has no FP8 tensor cores (needs ≥ 8.9)"
    if not hasattr(torch, "_scaled_mm"):
        return False, "this torch build has no torch._scaled_mm"
    return True, f"native FP8 matmul (compute capability {cc[0]}.{cc[1]})"


def quantize_e4m3(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """``(q, s)``: ``x`` ≈ ``q.float() · s`` with ``q`` E4M3 and ``s`` = max|x| / 448 over ``dim``
    (kept as a size-1 dimension; float32)."""
    s = x.detach().float().abs().amax(dim, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    return (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), s


def fp8_state(model: nn.Module) -> dict[str, Tensor]:
    """Every Linear/Conv2d weight as ``KEY.f8`` + ``KEY.scale8`` (per output channel), the rest fp32."""
    keys = weight_keys(model)
    out: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        if k in keys:
            w = v.detach().float()
            q, s = quantize_e4m3(w.flatten(1), 1)
            out[f"{k}.f8"], out[f"{k}.scale8"] = q.view_as(w), s.reshape(-1)
        else:
            out[k] = v.detach().float()
    return out


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


class Fp8Linear(nn.Module):
    """``y ≈ x · Wᵀ + b`` with ``x`` quantized per row and ``W`` per output channel to E4M3.

    ``backend``: ``scaled_mm`` (native; K and N zero-padded to multiples of 16) or ``emulated``.
    """

    def __init__(self, w8: Tensor, scale: Tensor, bias: Tensor | None, backend: str) -> None:
        super().__init__()
        if backend not in ("scaled_mm", "emulated"):
            raise ValueError(f"fp8 backend: unknown {backend!r}; expected 'scaled_mm' or 'emulated'")
        self.backend = backend
        self.out_features, self.in_features = w8.shape
        self.register_buffer("bias", None if bias is None else bias.float())
        if backend == "scaled_mm":
            kp, np_ = _pad16(self.in_features), _pad16(self.out_features)
            w = torch.zeros(np_, kp, dtype=FP8, device=w8.device)
            w[: self.out_features, : self.in_features] = w8
            sc = torch.ones(np_, dtype=torch.float32, device=w8.device)
            sc[: self.out_features] = scale.float()
            self.register_buffer("w8", w)
            self.register_buffer("scale_b", sc.view(1, -1))
        else:  # the FP8 weight's exact values in fp32
            self.register_buffer("weight", w8.float() * scale.float().view(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        q, a = quantize_e4m3(x2, 1)  # (M, K) E4M3, (M, 1) fp32
        if self.backend == "emulated":
            y = torch.nn.functional.linear(q.float() * a, self.weight, self.bias)
        else:
            kp = self.w8.shape[1]
            if kp != self.in_features:
                q = torch.nn.functional.pad(q.view(torch.uint8), (0, kp - self.in_features)).view(FP8)
            y = torch._scaled_mm(q.contiguous(), self.w8.t(), scale_a=a, scale_b=self.scale_b,
                                 out_dtype=torch.bfloat16)[:, : self.out_features].float()
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, -1).to(x.dtype)


def check_fp8_state(model: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    """ModelError naming ``where`` and the first tensor an FP8 file lacks, adds or shapes wrongly."""
    keys = weight_keys(model)
    expected: dict[str, tuple[int, ...]] = {}
    for key, v in model.state_dict().items():
        if key in keys:
            expected |= {f"{key}.f8": tuple(v.shape), f"{key}.scale8": (int(v.shape[0]),)}
        else:
            expected[key] = tuple(v.shape)
    check_shapes(expected, state, where, "fp8 weights")
    from rectflow.nets import ModelError

    bad = next((k for k in state if k.endswith(".f8") and state[k].dtype != FP8), None)
    if bad is not None:
        raise ModelError(f"{where}: fp8 weights do not match the architecture ({bad}: {state[bad].dtype}, "
                         "expected float8_e4m3fn)")


def build_fp8(card: dict[str, Any], state: dict[str, Tensor], backend: str, where: Path,
              device: torch.device | str = "cpu") -> nn.Module:
    """The float architecture of ``card`` with every Linear an :class:`Fp8Linear` and every Conv2d
    given its dequantized weight, on ``device``."""
    model = build_model(card["arch"])
    check_fp8_state(model, state, where)
    floats = {k: v.float() for k, v in state.items() if not k.endswith(FP8_KEYS)}
    convs = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for key in convs:
        w8, s = state[f"{key}.f8"], state[f"{key}.scale8"]
        floats[key] = w8.float() * s.float().view(-1, *([1] * (w8.ndim - 1)))
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in floats:
                v.copy_(floats[k])
    model.to(device)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            key = f"{name}.weight"
            new = Fp8Linear(state[f"{key}.f8"].to(device), state[f"{key}.scale8"].to(device),
                            None if mod.bias is None else floats[f"{name}.bias"].to(device), backend)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model.eval()
