"""The training memory estimate against the measured peak, plain LoRA and DoRA, on this machine's CPU.

Each case runs in its own process: a random GPT-2-shaped model is built, a few training steps run, and
the peak resident memory of each step (Linux VmHWM, reset between steps through /proc/self/clear_refs)
above the process's resident memory before the model existed is compared with
`estimate_training(...).peak_bytes`. The first step (optimizer state appears) is left out.

    python bench/memory.py                # width 256, 4 layers, at 4x128 and 8x256
    python bench/memory.py --case 1 all 8 256   # one case: dora(0/1) targets batch seq_len

Linux only (VmHWM and clear_refs); the ratio is estimate / measured, so < 1 means the estimate is low.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

CASES = [(dora, targets, B, T) for B, T in ((4, 128), (8, 256)) for targets in ("attn.c_attn,mlp.c_fc", "all")
         for dora in (0, 1)]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def one_case(dora: bool, targets: str, B: int, T: int, steps: int = 4) -> dict:
    import torch
    from core.lora.config import LoraConfig
    from core.model.config import TARGET_MODULES, GPTConfig
    from core.train.config import TrainConfig
    from core.model.gpt import GPT, init_random_
    from core.train import data
    from core.train.estimate import estimate_training
    from core.train.loop import train_chunk
    from core.train.trainer import Trainer
    torch.set_num_threads(2)
    ds = data.prepare(text=data.load_sample("brainrot") * 20, text_name="brainrot.txt")
    gc.collect()
    before = _status("VmRSS")
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=int(os.environ.get("BENCH_WIDTH", 256)))
    model = init_random_(GPT(cfg))
    lc = LoraConfig(r=8, targets=TARGET_MODULES if targets == "all" else tuple(targets.split(",")), use_dora=dora)
    tc = TrainConfig(steps=steps, lr=1e-3, batch_size=B, seq_len=T, grad_accum=1, eval_interval=10_000,
                     checkpoint_interval=10_000, seed=1)
    peaks = []
    with tempfile.TemporaryDirectory() as run:
        def on_event(event):
            if event["type"] == "step":
                gc.collect()
                peaks.append(_status("VmHWM") - before)
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        last = train_chunk(Trainer(model, ds, lc, tc, "m", Path(run) / "run"), on_event=on_event).events[-1]
        if last["type"] == "error":
            raise RuntimeError(last["message"])
    est = estimate_training(cfg, lc, tc, "cpu")
    return {"measured": max(peaks[1:]), "estimate": est.peak_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=4, metavar=("DORA", "TARGETS", "BATCH", "SEQ"), help="run one case, print JSON")
    args = ap.parse_args()
    if args.case:
        d, targets, B, T = args.case
        print(json.dumps(one_case(d == "1", targets, int(B), int(T))))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # big buffers go back to the OS when freed
    rows = []
    for dora, targets, B, T in CASES:
        out = subprocess.run([sys.executable, __file__, "--case", str(dora), targets, str(B), str(T)],
                             capture_output=True, text=True, env=env, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(["DoRA" if dora else "LoRA", targets, f"{B}x{T}", f"{r['measured'] / 2**20:.0f}",
                     f"{r['estimate'] / 2**20:.0f}", f"{r['estimate'] / r['measured']:.2f}"])
    print(machine())
    print("width 256, 4 layers, rank 8; MiB above the process before the model was built")
    print(table(rows, ["variant", "targets", "batch", "measured peak", "estimate", "estimate/measured"]))


if __name__ == "__main__":
    main()
