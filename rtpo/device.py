"""Where a process computes and in which precision: the "auto" rules, written once.

Every backend decides its device and autocast dtype here when it is built (before the models are
loaded); the run reads them from the backend and never writes them back into the config."""

from __future__ import annotations

import torch

from rtpo.config import ConfigError


def auto_device(name: str) -> str:
    """run.device -> a device name: "auto" is CUDA when there is one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"run.device = {name!r} but CUDA is not available; use --run.device cpu")
    return name


def auto_dtype(name: str, device: str) -> torch.dtype | None:
    """run.dtype on `device` -> the autocast dtype (None: float32): "auto" is bfloat16 on a GPU that
    supports it, else float32."""
    if name == "auto":
        on_gpu = device.startswith("cuda") and torch.cuda.is_available()
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else None
    return None if name == "float32" else getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of a forward pass: off (float32) when dtype is None."""
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)
