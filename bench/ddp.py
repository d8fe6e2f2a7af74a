"""Data-parallel training, 1 process vs N (issue 17): the same run (same global batch, seed and steps) on one
device with `python -m core finetune`, then on N under torchrun. Prints and writes (--json) tokens/s of each
(the median step after the first few), the speed-up, and how far the two adapters and loss curves differ.

    python bench/ddp.py --nproc 4 --json ddp.json                       # GPUs: gpt2-shaped random weights
    python bench/ddp.py --nproc 2 --device cpu --model tiny --steps 6   # a CPU smoke check of the script
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def base_args(a, work: Path) -> list[str]:
    if a.model == "tiny":
        return ["--model", "tiny"]
    import torch
    from core.model.config import PRESETS
    from core.model.gpt import GPT, init_random_
    from core.model.weights import save_hf
    folder = work / "base"
    save_hf(init_random_(GPT(PRESETS[a.model]), 0), folder, dtype=torch.float32)
    return ["--weights", str(folder)]


def finetune(a, work: Path, model: list[str], name: str, nproc: int) -> dict:
    """One run; its tokens/s (median over the steps after the first 3), its losses and its adapter."""
    from safetensors.torch import load_file
    launcher = [sys.executable, "-m", "core"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "core"]
    device = a.device if nproc == 1 or a.device == "cpu" else "auto"  # torchrun: one GPU per rank
    cmd = [*launcher, "finetune", "--data", str(work / "ds"), "--library", str(work / "lib"), "--output", name,
           *model, "--device", device, "--steps", str(a.steps), "--batch-size", str(a.batch_size),
           "--seq-len", str(a.seq_len), "--grad-accum", "1", "--lr", "1e-4", "--eval-interval", "0",
           "--checkpoint-interval", "0", "--log-interval", str(a.steps)]
    r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    run = work / "lib" / name
    from core.adapters import run_record
    history = list(run_record.history(run))
    rates = [h["tokens_per_sec"] for h in history[3:]] or [h["tokens_per_sec"] for h in history]
    return {"tokens_per_sec": statistics.median(rates), "losses": [h["loss"] for h in history],
            "adapter": load_file(str(run / "adapter_model.safetensors"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, required=True, help="processes (GPUs) of the data-parallel run")
    ap.add_argument("--model", default="gpt2", choices=["gpt2", "tiny"])
    ap.add_argument("--device", default="cuda:0", help="the 1-process run's device (cpu: gloo for the N run)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=0, help="global rows per step (default 16 x nproc)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    a.batch_size = a.batch_size or 16 * a.nproc
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "ds").mkdir()
        rng = np.random.default_rng(0)
        np.save(work / "ds" / "train_00000.npy", rng.integers(0, 50257, 200_000).astype(np.uint16))
        np.save(work / "ds" / "val_00000.npy", rng.integers(0, 50257, 2_000).astype(np.uint16))
        model = base_args(a, work)
        one = finetune(a, work, model, "one", 1)
        many = finetune(a, work, model, "many", a.nproc)
    diff = max(float((one["adapter"][k] - many["adapter"][k]).abs().max()) for k in one["adapter"])
    res = {"measured": True, "nproc": a.nproc, "model": a.model, "global_batch": a.batch_size, "seq_len": a.seq_len,
           "steps": a.steps, "tokens_per_sec_1": one["tokens_per_sec"], "tokens_per_sec_n": many["tokens_per_sec"],
           "speedup": many["tokens_per_sec"] / one["tokens_per_sec"], "adapter_max_abs_diff": diff,
           "loss_max_abs_diff": max(abs(x - y) for x, y in zip(one["losses"], many["losses"]))}
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
