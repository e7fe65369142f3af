"""Quantized variants of a model, with the same interface (``v(x, t)``) as the fp32 one.

On disk a quantized model is still ``NAME.safetensors`` + ``NAME.json``:

- ``int8``: every ``nn.Linear`` weight stored as per-output-channel symmetric int8
  (``W ≈ q · s``, ``q = round(W / s)``, ``s = max|W_row| / 127``) plus its float32 scales; all other
  tensors in float32. At load time the int8 weights are handed to a compute backend:
  ``torchao`` (weight-only int8, ``Int8WeightOnlyConfig``; the maintained PyTorch path) or
  ``dynamic`` (``torch.ao.quantization.quantize_dynamic``, deprecated, int8 activations too).
  Convolutions (U-Net) stay in float32 weights dequantized from int8 storage.
- ``int4``: every Linear and Conv2d weight group-wise asymmetric 4-bit (``W ≈ q · scale + offset``
  per ``group_size`` input columns, codes packed two to a byte, scales and offsets float16), each
  Linear and Conv2d with AWQ's activation-aware input scales searched on calibration draws of the
  model's source, against the model's output (:func:`int4_state`). Linears compute through the x86 int4 kernel (``int4pack``) or
  weights dequantized at load (``dequant``), whichever measures faster; convolutions dequantized.
- ``bf16``: every floating tensor stored and computed in bfloat16 (native on AVX-512-bf16 CPUs and
  on recent GPUs; float16 is emulated on CPUs and much slower).
- ``fp8``: E4M3 weights and activations (:mod:`rectflow.fp8`): native on GPUs with FP8 matmuls,
  emulated in fp32 elsewhere.

The quantize stage picks each variant's backend by measuring the candidates at the evaluation batch
size (``auto``) and records the choice and the timings in ``meta``.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.nets import ModelError, build_model, check_shapes, check_state, load_state, weight_keys

__all__ = ["dequantize_state", "int8_state", "load_quantized", "apply_backend", "pick_backend", "int4_state",
           "pack_int4", "unpack_int4", "quantize_int4", "dequantize_int4", "Int4Linear",
           "pick_int4_backend"]


def int8_state(model: nn.Module) -> dict[str, Tensor]:
    """Per-channel symmetric int8 of every Linear/Conv weight (``KEY.q`` int8, ``KEY.scale`` fp32)."""
    keys = weight_keys(model)
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


def pick_backend(model: nn.Module, shape: tuple[int, ...], batch: int,
                 errors: dict[str, float] | None = None) -> tuple[str, dict[str, float]]:
    """Measure each available int8 backend at ``batch``; return the fastest and all timings (ms).

    ``errors``, when given, receives each backend's mean squared velocity error against ``model``
    (fp32) relative to the velocity's mean square, on the same batch: ``dynamic`` also rounds activations to int8, so it is often the faster and the less
    exact (N→moons: W2 +7.8% against +0.0% for weights only); ``quantize.backend: torchao`` keeps
    the weights-only error."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    t = torch.zeros(batch)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        ref = model(x, t).float()
    for name in ("torchao", "dynamic"):
        try:
            m = apply_backend(model, name)
            timings[name] = 1000 * _time(m, x, t)
            if errors is not None:
                with torch.inference_mode():
                    errors[name] = float((m(x, t).float() - ref).pow(2).mean() / ref.pow(2).mean().clamp_min(1e-30))
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
    if quant == "int4":
        backend = card["meta"].get("backend", "dequant")
        if torch.device(device).type != "cpu":
            backend = "dequant"  # the int4pack kernel is the x86 one; elsewhere run the dequantized weights
        return build_int4(card, state, backend, where).to(device)
    if quant == "fp8":
        from rectflow.fp8 import build_fp8, fp8_native

        return build_fp8(card, state, "scaled_mm" if fp8_native(device)[0] else "emulated", where, device)
    raise ModelError(f"{Path(stem).with_suffix('.json')}: unknown quantization {quant!r} "
                     "(expected int8, int4, bf16 or fp8)")


class _BF16(nn.Module):
    """Runs a bf16 model behind the fp32 interface: inputs cast in, outputs cast back."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.average_velocity = bool(getattr(inner, "average_velocity", False))  # MeanFlow: u(x, t, end)
        self.classes = int(getattr(inner, "classes", 0))  # a conditional model: labels pass through
        self.guidance_input = bool(getattr(inner, "guidance_input", False))

    def forward(self, x: Tensor, t: Tensor, end: Tensor | None = None, **cond: Any) -> Tensor:
        b = torch.bfloat16
        if "w" in cond and cond["w"] is not None:
            cond["w"] = torch.as_tensor(cond["w"]).to(b)
        if end is None:
            return self.inner(x.to(b), t.to(b), **cond).to(x.dtype)
        return self.inner(x.to(b), t.to(b), torch.as_tensor(end).to(b), **cond).to(x.dtype)


# ---- int4: group-wise weight-only, activation-aware (AWQ) ----------------------------------------

INT4_KEYS = (".q4", ".scale4", ".offset4", ".act")


def pack_int4(q: Tensor) -> Tensor:
    """``(N, K)`` integers in [0, 15] (K even) → ``(N, K / 2)`` uint8, column 2j in the low nibble."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: ``(N, K / 2)`` uint8 → ``(N, K)`` uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def _padded(k: int, group: int) -> int:
    return -(-k // group) * group


def quantize_int4(w: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise 4-bit of ``w`` ``(N, K)``: ``W ≈ q · scale + offset`` per group of
    ``group`` input columns (K zero-padded to a multiple of ``group``).

    Returns ``q`` ``(N, Kp)`` uint8 in [0, 15], ``scale`` and ``offset`` ``(N, Kp / group)`` float16;
    ``q`` is computed against the float16-rounded scale and offset, so a weight already on the grid
    comes back exactly.
    """
    n, k = w.shape
    kp = _padded(k, group)
    wp = torch.nn.functional.pad(w.detach().float(), (0, kp - k)).view(n, kp // group, group)
    lo, hi = wp.amin(-1), wp.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8).half()
    offset = lo.half()
    q = torch.round((wp - offset.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return q.to(torch.uint8).view(n, kp), scale, offset


def dequantize_int4(q: Tensor, scale: Tensor, offset: Tensor, k: int) -> Tensor:
    """``(N, Kp)`` codes and ``(N, G)`` scales/offsets → the float32 ``(N, k)`` weight."""
    n, kp = q.shape
    g = kp // scale.shape[1]
    w = q.view(n, -1, g).float() * scale.float()[..., None] + offset.float()[..., None]
    return w.view(n, kp)[:, :k]


def _awq_candidates(w: Tensor, mean_abs: Tensor, group: int, grid: int):  # type: ignore[no-untyped-def]
    """For α on ``grid`` points of [0, 1]: (α, s per input channel, the float weight the layer
    computes with). ``w`` is ``(N, K)`` (a convolution flattened, K = C · kh · kw), ``mean_abs``
    ``(C,)``; each channel's scale covers its K / C columns."""
    rep = w.shape[1] // mean_abs.numel()
    for i in range(grid):
        alpha = i / (grid - 1)
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        cols = s.repeat_interleave(rep)
        q, sc, off = quantize_int4(w * cols, group)
        yield alpha, s, dequantize_int4(q, sc, off, w.shape[1]) / cols  # (x / s) Q(W s)ᵀ = x (Q(W s) / s)ᵀ


def call_with(model: nn.Module, calib: tuple[Any, ...]) -> Tensor:
    """``model(*calib)``; a last element that is a dict holds keyword inputs (a conditional
    model's labels ``y``)."""
    if calib and isinstance(calib[-1], dict):
        return model(*calib[:-1], **calib[-1])
    return model(*calib)


def _input_magnitudes(model: nn.Module, calib: tuple[Tensor, ...]) -> dict[str, Tensor]:
    """mean |input| per input channel of every Linear and Conv2d of ``model`` on the calibration
    batch ``(x, t[, end])``, in the order the forward pass reaches them."""
    seen: dict[str, Tensor] = {}

    def hook(name: str, conv: bool):  # type: ignore[no-untyped-def]
        def f(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
            a = args[0].detach().float()
            seen[name] = a.abs().mean((0, 2, 3)) if conv else a.flatten(0, -2).abs().mean(0)
        return f

    hooks = [m.register_forward_pre_hook(hook(name, isinstance(m, nn.Conv2d)))
             for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            call_with(model, calib)
    finally:
        for h in hooks:
            h.remove()
    return seen


def int4_state(model: nn.Module, group: int, calib: tuple[Tensor, ...] | None,
               grid: int = 11) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Group-wise int4 of every Linear and Conv2d weight (``KEY.q4`` packed uint8, ``KEY.scale4`` and
    ``KEY.offset4`` float16; a convolution flattened to ``(out, in · kh · kw)``).

    With a calibration batch ``calib`` = ``(x, t)`` (``(x, t, end)`` for an average-velocity
    network; a conditional network's labels in a last ``{"y": y}``) every such layer gets AWQ's activation-aware
    input-channel scales ``s = mean|x|^α`` (``KEY.act`` = s, float32: the layer computes
    ``(x / s) ∗ Q(W · s)``), α searched on ``grid`` points of [0, 1] against the *model's output*:
    layer by layer in forward order, earlier layers already quantized, the α with the least mean
    squared output error on the calibration batch wins (α = 0, round-to-nearest, is a candidate).
    Without it every layer is rounded to nearest. Every other tensor stays float32. Returns the state
    and a per-layer report (α, output MSE relative to the output's mean square)."""
    import copy

    kinds = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    codes: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    scales: dict[str, Tensor] = {}
    report: dict[str, Any] = {}
    if calib is None:
        for key, mod in kinds.items():
            codes[key] = quantize_int4(mod.weight.detach().float().flatten(1), group)
    else:
        work = copy.deepcopy(model).eval()
        mods = dict(work.named_modules())
        magnitudes = _input_magnitudes(model, calib)
        with torch.no_grad():
            ref = call_with(model, calib).float()
            norm = ref.pow(2).mean().clamp_min(1e-30).item()
            for name, mean_abs in magnitudes.items():
                key, layer = f"{name}.weight", mods[name]
                w = kinds[key].weight.detach().float().flatten(1)
                best: tuple[float, float, Tensor, Tensor] | None = None
                for alpha, s, wq in _awq_candidates(w, mean_abs.clamp_min(1e-8), group, grid):
                    layer.weight.copy_(wq.view_as(layer.weight))
                    err = (call_with(work, calib).float() - ref).pow(2).mean().item()
                    if best is None or err < best[0]:
                        best = (err, alpha, s, wq)
                assert best is not None
                layer.weight.copy_(best[3].view_as(layer.weight))
                scales[key] = best[2]
                codes[key] = quantize_int4(w * best[2].repeat_interleave(w.shape[1] // best[2].numel()), group)
                report[name] = {"alpha": best[1], "rel_error": best[0] / norm}
        for key, mod in kinds.items():  # a layer the forward pass never reached: rounded to nearest
            codes.setdefault(key, quantize_int4(mod.weight.detach().float().flatten(1), group))
    out: dict[str, Tensor] = {}
    for key, v in model.state_dict().items():
        if key not in kinds:
            out[key] = v.detach().float()
            continue
        q, scale, offset = codes[key]
        out[f"{key}.q4"], out[f"{key}.scale4"], out[f"{key}.offset4"] = pack_int4(q), scale, offset
        if key in scales:
            out[f"{key}.act"] = scales[key]
    return out, report


class Int4Linear(nn.Module):
    """``y = (x / s) · Q(W · s)ᵀ + b`` from int4 codes, through one of two backends:

    - ``int4pack``: the codes repacked for ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (x86 int4
      kernel, weights stay 4-bit in memory); input columns zero-padded to the group multiple;
    - ``dequant``: the weight unpacked once to float32 at load time (fp32 speed, fp32 memory).
    """

    def __init__(self, q4: Tensor, scale: Tensor, offset: Tensor, act: Tensor | None, bias: Tensor | None,
                 in_features: int, backend: str) -> None:
        super().__init__()
        self.in_features, self.backend = in_features, backend
        q = unpack_int4(q4)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.group = q.shape[1] // scale.shape[1]
        self.kp = q.shape[1]
        self.out_features = q.shape[0]
        if backend == "int4pack":
            # the kernel wants N a multiple of 16: zero rows are added and their outputs dropped
            extra = _padded(self.out_features, 16) - self.out_features
            q, sc, off = (torch.nn.functional.pad(a, (0, 0, 0, extra)) for a in (q, scale.float(), offset.float()))
            self.register_buffer("inv_act", None if act is None else 1.0 / act.float())  # x / s before the kernel
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            # the kernel's form: w = (q − 8) · scale + zero, scales and zeros (G, N, 2)
            self.register_buffer("scale_zeros", torch.stack([sc, off + 8 * sc], -1).transpose(0, 1).contiguous())
        elif backend == "dequant":  # 1 / s folded into the weight's columns
            w = dequantize_int4(q, scale, offset, in_features)
            self.register_buffer("weight", w if act is None else w / act.float())
            self.inv_act = None  # a plain attribute: nothing to divide at run time
        else:
            raise ValueError(f"quantize.int4.backend: unknown {backend!r}; expected 'int4pack' or 'dequant'")

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1]).float()
        if self.inv_act is not None:
            x = x * self.inv_act
        if self.backend == "dequant":
            y = torch.nn.functional.linear(x, self.weight, self.bias)
        else:
            if self.kp != self.in_features:
                x = torch.nn.functional.pad(x, (0, self.kp - self.in_features))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, self.scale_zeros)
            y = y[:, : self.out_features]
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, -1)


def check_int4_state(model: nn.Module, state: dict[str, Tensor], group: int, where: Path) -> None:
    """ModelError naming ``where`` and the first tensor an int4 file lacks, adds or shapes wrongly
    for the architecture ``model`` (a card that does not fit its weights)."""
    expected: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())
    for key, v in model.state_dict().items():
        mod = modules.get(key[: -len(".weight")]) if key.endswith(".weight") else None
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            n, k = v.shape[0], int(v[0].numel())
            kp = _padded(k, group)
            expected |= {f"{key}.q4": (n, kp // 2), f"{key}.scale4": (n, kp // group), f"{key}.offset4": (n, kp // group)}
            if f"{key}.act" in state:
                expected[f"{key}.act"] = (int(v.shape[1]),)  # one scale per input channel
        else:
            expected[key] = tuple(v.shape)
    check_shapes(expected, state, where, "int4 weights")


def build_int4(card: dict[str, Any], state: dict[str, Tensor], backend: str, where: Path) -> nn.Module:
    """The float architecture of ``card`` with every Linear replaced by :class:`Int4Linear` and every
    Conv2d given its dequantized float32 weight."""
    group = int(card["meta"]["group_size"])
    model = build_model(card["arch"])
    check_int4_state(model, state, group, where)
    floats = {k: v.float() for k, v in state.items() if not k.endswith(INT4_KEYS)}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Conv2d):
            key = f"{name}.weight"
            w = dequantize_int4(unpack_int4(state[f"{key}.q4"]), state[f"{key}.scale4"], state[f"{key}.offset4"],
                                int(mod.weight[0].numel())).view_as(mod.weight)
            if f"{key}.act" in state:  # (x / s) ∗ Q(W s) = x ∗ (Q(W s) / s): folded into the weight
                w = w / state[f"{key}.act"].float().view(1, -1, 1, 1)
            floats[key] = w
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in floats:
                v.copy_(floats[k])
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            key = f"{name}.weight"
            new = Int4Linear(state[f"{key}.q4"], state[f"{key}.scale4"], state[f"{key}.offset4"], state.get(f"{key}.act"),
                             None if mod.bias is None else floats[f"{name}.bias"], mod.in_features, backend)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
    return model.eval()


def pick_int4_backend(card: dict[str, Any], state: dict[str, Tensor], batch: int) -> tuple[str, dict[str, float]]:
    """Measure both int4 backends at ``batch`` (the int4pack kernel only where this torch has it);
    return the faster and all timings (ms)."""
    shape = tuple(card["arch"]["shape"])
    x, t = torch.randn(batch, *shape), torch.zeros(batch)
    timings: dict[str, float] = {}
    for name in ("int4pack", "dequant"):
        try:
            timings[name] = 1000 * _time(build_int4(card, state, name, Path("<measured>")), x, t)
        except (RuntimeError, NotImplementedError, AttributeError):  # kernel absent or the shapes unsupported
            continue
    return min(timings, key=timings.__getitem__), timings
