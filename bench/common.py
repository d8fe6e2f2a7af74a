"""Shared benchmark helpers: a random gpt2-shaped checkpoint both engines load, and a table printer."""
from __future__ import annotations

import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def random_hf_checkpoint(n_layer=12, n_head=12, n_embd=768, seed=0, folder=None) -> Path:
    """A random GPT-2 written by transformers (so both sides read the same file)."""
    import transformers
    folder = Path(folder or tempfile.mkdtemp(prefix="bench-gpt2-"))
    if (folder / "model.safetensors").exists():
        return folder
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    from core.device import cpu_has_native_bf16
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"  # what --precision auto follows
    return f"{cpu} ({bf16}), {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def table(rows: list[list], header: list[str]) -> str:
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cols[1:]])
