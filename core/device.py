"""Device and dtype choice: CUDA (bf16) first, then Apple MPS, then CPU."""
from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """'auto' picks the best available; 'cuda', 'cuda:1', 'mps', 'cpu' force one (with a clear error)."""
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto.")
    if pref == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("Apple MPS was requested but is not available; use --device cpu or auto.")
    if pref not in ("cpu", "mps") and not pref.startswith("cuda"):
        raise RuntimeError(f"unknown device {preference!r}; use auto, cuda, mps or cpu.")
    return torch.device(pref)


def default_dtype(device: torch.device) -> torch.dtype:
    """Frozen-base weight dtype: bf16 on CUDA GPUs that support it, fp32 elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
