"""Device and dtype choice (CUDA bf16 first, then Apple MPS, then CPU), how much memory is free, and
the GPU helpers the trainer and the decoders share: the autocast choice, the OOM test, the capture guard."""
from __future__ import annotations

import contextlib
import os
import threading
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


PRECISIONS = ("auto", "fp32", "bf16")
# CPU flags of native bf16 arithmetic: AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4+) and AMX
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU computes bf16 matmuls natively (faster than fp32): x86 with AVX-512 BF16 or AMX
    (Linux /proc/cpuinfo flags), or Apple silicon from M2 on (FEAT_BF16). Without it torch emulates bf16,
    several times slower than fp32 (numbers: docs/performance.md), so bf16 is only the default where native."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return any(f in line.split(":", 1)[1].split() for f in BF16_CPU_FLAGS)
    import platform
    import subprocess
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5)
            return out.stdout.strip() == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    return False


def precision_dtype(precision: str, device: torch.device, native_bf16: bool | None = None) -> torch.dtype:
    """The frozen base's dtype for --precision: fp32, bf16, or auto (bf16 where the device computes it
    natively: CUDA GPUs with bf16, CPUs with AVX-512 BF16/AMX or Apple M2+; fp32 elsewhere, MPS included).
    LoRA weights and optimizer state stay fp32 whatever the base."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32 or bf16.")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bf16 support; use --precision fp32 or auto.")
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if (cpu_has_native_bf16() if native_bf16 is None else native_bf16) else torch.float32
    return default_dtype(device)


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def sums_in_fp32_while_generating(x: torch.Tensor) -> bool:
    """Generating on a bf16 base on the CPU: attention and the adapters' low-rank updates are summed in fp32,
    then rounded to bf16. In bf16, torch's batched products and padded attention round differently with the
    batch's size and longest row, so a decode step's rows would depend on who else is in the batch; in fp32
    that difference is in the last bit, below bf16's rounding (bench/load.py shows how often bf16 sums differ)."""
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()


def autocast_for(model) -> contextlib.AbstractContextManager:
    """bf16 autocast for an fp32 model on a CUDA GPU with bf16; nothing otherwise (bf16 weights, CPU)."""
    if model.dtype == torch.float32 and default_dtype(model.device) == torch.bfloat16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def openmp_runtime() -> str | None:
    """The path of the OpenMP runtime torch runs its CPU ops on, when it is one and is loaded (Linux: read from
    this process's memory map; elsewhere from torch's own lib folder); None otherwise."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    names = ("libgomp", "libomp", "libiomp5")
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
            if Path(path).name.startswith(names):
                return path
    except OSError:
        pass
    libs = Path(torch.__file__).parent / "lib"
    found = sorted(p for p in libs.glob("lib*omp*") if p.name.startswith(names)) if libs.is_dir() else []
    return str(found[0]) if found else None


def threads_for_this_thread(n: int) -> bool:
    """Run torch's parallel CPU loops (layer norms, GELU, top-k, ...) on `n` threads for the calling thread
    alone, leaving every other thread's setting and the BLAS's own threads for matrix products as they are:
    OpenMP keeps the thread count per thread. For a thread of small ops while other threads keep the cores
    busy (decode steps while Gradio runs), a team of threads spends more waiting for a free core than it
    saves. Returns whether it took effect (False without an OpenMP runtime: nothing changes)."""
    path = openmp_runtime()
    if path is None:
        return False
    import ctypes
    try:
        ctypes.CDLL(path).omp_set_num_threads(n)  # the loaded runtime (dlopen returns the same handle)
    except (OSError, AttributeError):
        return False
    return torch.get_num_threads() == n


def is_oom(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or an allocator failure reported as a RuntimeError (CPU, MPS)."""
    msg = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg)


class CaptureGuard:
    """Readers-writer lock for CUDA graph capture in a process where several threads use the GPU.

    Generation steps and training micro-steps hold it shared; a capture (a decode graph, or the
    trainer's step) holds it alone, so no other thread launches work while a stream is capturing.
    Writers go first once waiting, so a stream of generations cannot starve a capture. Not
    re-entrant: never take it while already holding it.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self, active: bool = True):
        if not active:  # CPU: nothing is ever captured
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


GUARD = CaptureGuard()  # the process's one guard: every capture and every GPU user shares it
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
