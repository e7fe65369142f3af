"""Device selection: CUDA when present (or ``RECTFLOW_DEVICE``), else CPU; bf16 capability."""

from __future__ import annotations

import os

import torch

__all__ = ["bf16_supported", "pick_device"]


def pick_device() -> torch.device:
    """``RECTFLOW_DEVICE`` if set (``cpu``, ``cuda``, ``cuda:1``), else CUDA if available, else CPU.

    Under ``torchrun`` the local rank selects the GPU.
    """
    from rectflow.settings import settings

    name = settings().device
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"
