"""Velocity networks and their files.

A model on disk is two files: ``NAME.safetensors`` (weights, never a pickle) and ``NAME.json``
(``{"arch": {...}, "meta": {...}}``: everything needed to rebuild the module, plus provenance).
:func:`load_model` checks that the weights match the architecture and names the file if not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rectflow.errors import InputError
from rectflow.io import atomic_write_bytes, atomic_write_json, file_sha256, require_file
from rectflow.layers import Conditioning, IntervalEmbedding, SinusoidalEmbedding, interval, time_vector

__all__ = ["MLPVelocity", "ModelError", "SinusoidalEmbedding", "build_model", "save_model"]


class ModelError(InputError, ValueError):
    """A model file is missing, unreadable, or its weights do not match its architecture."""


class MLPVelocity(nn.Module):
    """v(x, t) for vector data: ``x`` ``(B, *shape)`` and ``t`` ``(B,)`` -> ``(B, *shape)``.

    ``[x, emb(t)] -> Linear -> SiLU -> (Linear -> SiLU) × (depth − 1) -> Linear``.

    ``average=True``: an average-velocity network u(x, t, end) (MeanFlow), ``[x, emb(t),
    emb(end − t)]`` in; ``end=None`` is end = t, the instantaneous velocity, so it serves every
    solver, and Euler steps it from grid point to grid point (:mod:`rectflow.solvers`).

    ``classes=K > 0``: a conditional network v(x, t, y), ``y`` ``(B,)`` in [0, K] (K, or ``y=None``:
    the null class ∅), whose label embedding is added to the time features; ``guidance_input``:
    the guidance scale ``w`` ``(B,)`` or scalar is embedded and added too (:mod:`rectflow.guidance`).
    ``classes=0`` builds exactly the unconditional network (same parameters, same weights).
    """

    def __init__(self, shape: tuple[int, ...], hidden: int = 256, depth: int = 3, time_embed: int = 64,
                 average: bool = False, classes: int = 0, guidance_input: bool = False) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.average_velocity = average
        dim = math.prod(self.shape)
        self.temb = IntervalEmbedding(time_embed) if average else SinusoidalEmbedding(time_embed)
        self.cond = Conditioning(classes, time_embed, guidance_input) if classes else None
        self.classes, self.guidance_input = int(classes), bool(guidance_input and classes)
        layers: list[nn.Module] = [nn.Linear(dim + time_embed, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor | float, end: Tensor | float | None = None, *,
                y: Tensor | None = None, w: Tensor | float | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        b = x.shape[0]
        if self.average_velocity:
            tt = interval(t, end, b, x)
        elif end is not None:
            raise ValueError("end: this network is a velocity v(x, t), not an average velocity u(x, t, end)")
        else:
            tt = time_vector(t, b, x)
        emb = self.temb(tt)
        if self.cond is not None:
            emb = emb + self.cond(y, w, b, emb)
        elif y is not None or w is not None:
            raise ValueError("y: this network is unconditional (no classes); it takes no labels")
        h = torch.cat([x.reshape(b, -1), emb], dim=1)
        return self.net(h).reshape(x.shape)


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Rebuild a velocity network from its architecture record (``NAME.json['arch']``)."""
    kind = arch.get("kind")
    shape = tuple(arch["shape"])
    if kind == "mlp":
        return MLPVelocity(shape, arch["hidden"], arch["depth"], arch["time_embed"], bool(arch.get("average", False)),
                           int(arch.get("classes", 0)), bool(arch.get("guidance_input", False)))
    if kind == "unet":
        from rectflow.unet import UNetVelocity

        if len(shape) != 3:
            raise ModelError(f"unet needs (c, h, w) data, got shape {shape}")
        return UNetVelocity(
            shape,  # type: ignore[arg-type]
            channels=arch["channels"],
            channel_mult=tuple(arch["channel_mult"]),
            attention=arch["attention"],
            time_embed=arch["time_embed"],
            dropout=arch.get("dropout", 0.0),
            average=bool(arch.get("average", False)),
            classes=int(arch.get("classes", 0)),
            guidance_input=bool(arch.get("guidance_input", False)),
        )
    raise ModelError(f"unknown model kind {kind!r}; expected 'mlp' or 'unet'")


def arch_from_params(model_params: Any, shape: tuple[int, ...], key: str = "model", classes: int = 0) -> dict[str, Any]:
    """The architecture record for data of ``shape`` under ``params.model`` (or the section at
    ``key``, e.g. ``distill.student``: named in the error); ``classes`` > 0: a conditional network
    (the key is absent for an unconditional one, whose record is unchanged)."""
    kind = model_params.kind
    if kind == "auto":
        kind = "unet" if len(shape) == 3 else "mlp"
    if kind == "unet" and len(shape) != 3:
        raise ModelError(f"{key}.kind: 'unet' needs (c, h, w) data, got shape {shape}")
    arch: dict[str, Any] = {"kind": kind, "shape": list(shape), "time_embed": model_params.time_embed}
    if kind == "mlp":
        arch |= {"hidden": model_params.hidden, "depth": model_params.depth}
    else:
        arch |= {
            "channels": model_params.channels,
            "channel_mult": list(model_params.channel_mult),
            "attention": model_params.attention,
            "dropout": model_params.dropout,
        }
    if classes:
        arch["classes"] = int(classes)
    return arch


def weight_keys(model: nn.Module) -> set[str]:
    """The state keys of every Linear and Conv2d weight of ``model`` (what the quantized variants
    store in fewer bits)."""
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(stem: Path, state: dict[str, Tensor], arch: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write ``stem.safetensors`` and ``stem.json`` atomically; returns the weights' sha256."""
    from safetensors.torch import save

    stem = Path(stem)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write_bytes(stem.with_suffix(".safetensors"), save(tensors))
    sha = file_sha256(stem.with_suffix(".safetensors"))
    atomic_write_json(stem.with_suffix(".json"), {"arch": arch, "meta": meta | {"sha256": sha}})
    return sha


def read_model_card(stem: Path) -> dict[str, Any]:
    path = Path(stem).with_suffix(".json")
    require_file(path, ModelError, f"{path}: model description not found")
    try:
        card = json.loads(path.read_text())
        card["arch"]["kind"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ModelError(f"{path}: not a model description (expected JSON with 'arch')") from None
    return card


def load_state(stem: Path) -> dict[str, Tensor]:
    """The weights of ``stem`` (safetensors only: never a pickle), checked against the sha256 its
    card (``stem.json``, when present) recorded when they were saved."""
    import hashlib

    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(stem).with_suffix(".safetensors")
    require_file(path, ModelError, f"{path}: weights not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror})") from None
    expected = _card_sha256(Path(stem))
    if expected is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise ModelError(
                f"{path}: sha256 {digest[:12]}… does not match the {expected[:12]}… recorded in "
                f"{Path(stem).with_suffix('.json').name}; the weights were changed or damaged"
            )
    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not readable safetensors ({' '.join(str(e).split())[:200]})") from None
    bad = next((k for k, v in state.items() if v.is_floating_point() and not _finite(v)), None)
    if bad is not None:
        raise ModelError(f"{path}: weights contain NaN or infinite values (first in {bad!r}); the model is unusable "
                         "(retrain it: rerun the stage that made it)")
    _check_against_card(Path(stem), state)
    return state


def _finite(v: Tensor) -> bool:
    """No NaN or inf in ``v`` (8-bit floats, which have no isfinite kernel, checked in float32)."""
    if v.element_size() == 1:
        v = v.float()
    return bool(torch.isfinite(v).all())


def _card(stem: Path) -> dict[str, Any] | None:
    try:
        card = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def _card_sha256(stem: Path) -> str | None:
    meta = (_card(stem) or {}).get("meta")
    sha = meta.get("sha256") if isinstance(meta, dict) else None
    return sha if isinstance(sha, str) else None


def _check_against_card(stem: Path, state: dict[str, Tensor]) -> None:
    """Weights that do not fit the architecture in ``stem.json`` are a ModelError naming the file,
    whoever loads them (an empty module is built on the meta device: no memory, no compute)."""
    card = _card(stem)
    if card is None or not isinstance(card.get("arch"), dict):
        return
    if isinstance(card.get("meta"), dict) and card["meta"].get("quant"):
        return  # quantized layouts are checked by rectflow.quant
    try:
        with torch.device("meta"):
            model = build_model(card["arch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, ModelError):
            raise ModelError(f"{stem.with_suffix('.json')}: {e}") from None
        raise ModelError(f"{stem.with_suffix('.json')}: architecture incomplete or invalid "
                         f"({e.__class__.__name__}: {' '.join(str(e).split())[:200]})") from None
    check_state(model, state, stem.with_suffix(".safetensors"))


def check_state(model: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    """Raise :class:`ModelError` naming the first key whose presence or shape disagrees."""
    check_shapes({k: tuple(v.shape) for k, v in model.state_dict().items()}, state, where, "weights")


def check_shapes(expected: dict[str, tuple[int, ...]], state: dict[str, Tensor], where: Path, what: str) -> None:
    """:class:`ModelError` naming ``where`` and the first key of ``state`` missing, unexpected or of
    another shape than ``expected`` says (``what``: "weights", "int4 weights", …)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        first = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise ModelError(f"{where}: {what} do not match the architecture ({first})")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ModelError(f"{where}: {what} do not match the architecture ({k}: {tuple(state[k].shape)} vs "
                             f"{tuple(shape)})")
