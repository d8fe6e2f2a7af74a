"""Device and dtype choice: CUDA (bf16) first, then Apple MPS, then CPU; and how much memory is free."""
from __future__ import annotations

import os
from pathlib import Path

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


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation can still get on `device` (None if unknown): free GPU memory plus what
    PyTorch's allocator holds unused; elsewhere the RAM available within any container limit
    (Apple MPS shares the system RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    found = [n for n in (_meminfo_available(), _cgroup_room()) if n is not None]
    return min(found) if found else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unixes: free pages only (a lower bound)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """A container's memory limit minus its use (Spaces and Docker cap memory below the host's
    MemAvailable); page cache it can drop (inactive files) counts as free. cgroup v2, then v1."""
    for folder, limit, usage, inactive in (("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                                           ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                            "memory.usage_in_bytes", "total_inactive_file")):
        try:
            cap = (Path(folder) / limit).read_text().strip()
            if cap == "max" or int(cap) >= 1 << 60:  # no limit set
                return None
            used = int((Path(folder) / usage).read_text())
            stat = dict(ln.split() for ln in (Path(folder) / "memory.stat").read_text().splitlines() if " " in ln)
            return max(0, int(cap) - used + int(stat.get(inactive, 0)))
        except (OSError, ValueError):
            continue
    return None
