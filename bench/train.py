"""LoRA training throughput and peak memory: this engine vs transformers + PEFT, same machine, one run.

Both sides load the same random gpt2-shaped (124M) checkpoint written by transformers, train a
rank-8 alpha-16 LoRA on c_attn with AdamW (lr 3e-4, clip 1.0) on the same random batches, and
compute the same loss (cross entropy over every position). This engine runs through its real
training loop (core.train.Trainer, step times from its events); the peer runs the plain loop
PEFT users write. Each side runs in its own process (so peak memory is its own), in alternating
rounds (ours, peer, peer, ours, ...) to spread machine noise; tokens/s is the median over rounds.

Peak memory over the timed steps (measured from the end of the warmup steps): CPU = the process's
peak resident set (VmHWM), CUDA = torch.cuda.max_memory_allocated; both include the weights. A step's
working memory = that peak minus what is held between steps (weights, optimizer state, libraries).

    python bench/train.py                                 # CPU, the seed's micro-batch 4 x 128
    python bench/train.py --device cuda --batch 16 --seq 1024
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, random_hf_checkpoint, sync, table  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RANK, ALPHA, LR, CLIP = 8, 16, 3e-4, 1.0


def proc_mem_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device) -> float:
    """Start measuring the peak from now (after the warmup steps); returns the memory in use now (MiB)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    return proc_mem_mb("VmRSS")


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return proc_mem_mb("VmHWM")


def tokens(n: int = 200_000) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, size=n, dtype=np.int64).astype(np.uint16)


# ---- the two sides (each runs in its own worker process) -------------------------------

def run_ours(ckpt, device, batch, seq, warmup, steps):
    from core.config import LoraConfig, TrainConfig
    from core.data import Dataset
    from core.train import Trainer
    from core.weights import load_base

    model = load_base(str(ckpt), device)
    ids = tokens()
    ds = Dataset(train=ids, val=ids[: seq + 1])
    tcfg = TrainConfig(steps=warmup + steps, lr=LR, warmup_steps=0, batch_size=batch, seq_len=seq, grad_accum=1,
                       grad_clip=CLIP, weight_decay=0.01, eval_interval=0, checkpoint_interval=0)
    out = Path(os.environ.get("BENCH_TMP", "/tmp")) / f"bench-train-{os.getpid()}"
    trainer = Trainer(model, ds, LoraConfig(r=RANK, alpha=ALPHA, targets=("attn.c_attn",)), tcfg, "bench", out)
    times, mem = [], {}
    try:
        for ev in trainer.run():
            if ev["type"] == "step":
                times.append(ev["step_time"])
                if ev["step"] == warmup:
                    mem["between"] = reset_peak(device)
                elif ev["step"] == warmup + steps:
                    mem["peak"] = peak_mb(device)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return times, mem


def run_peer(ckpt, device, batch, seq, warmup, steps):
    import transformers
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = transformers.GPT2LMHeadModel.from_pretrained(ckpt, dtype=dtype, attn_pdrop=0.0, resid_pdrop=0.0,
                                                         embd_pdrop=0.0).to(device)
    model = get_peft_model(model, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=device.type == "cuda" or None)
    ids = tokens()
    rng = np.random.default_rng(1337)
    mem, times = {}, []
    for i in range(warmup + steps):
        if i == warmup:
            mem["between"] = reset_peak(device)
        t0 = time.perf_counter()
        starts = rng.integers(0, len(ids) - seq, size=batch)
        win = torch.from_numpy(ids[starts[:, None] + np.arange(seq + 1)].astype(np.int64)).to(device)
        x, y = win[:, :-1], win[:, 1:]
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        sync(device)
        times.append(time.perf_counter() - t0)
    mem["peak"] = peak_mb(device)
    return times, mem


def worker(args) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = run_ours if args.worker == "ours" else run_peer
    times, mem = fn(args.ckpt, device, args.batch, args.seq, args.warmup, args.steps)
    timed = times[args.warmup:]
    print(json.dumps({"tok_s": args.batch * args.seq * len(timed) / sum(timed), "step_ms": 1000 * statistics.median(timed),
                      "peak_mb": mem["peak"], "between_mb": mem["between"]}))


# ---- the driver ---------------------------------------------------------------------

def spawn(side, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--ckpt", str(args.ckpt), "--device", args.device,
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
           "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{side} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 6 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 5 on CUDA)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per side (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--worker", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (30 if cuda else 6)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    if args.worker:
        return worker(args)

    args.ckpt = random_hf_checkpoint()  # gpt2 124M shapes, random weights, written by transformers
    try:
        run_rounds(args, cuda)
    finally:
        shutil.rmtree(args.ckpt, ignore_errors=True)


def run_rounds(args, cuda: bool) -> None:
    results = {"ours": [], "peer": []}
    order = ["ours", "peer"]
    for r in range(args.rounds):
        for side in (order if r % 2 == 0 else order[::-1]):
            res = spawn(side, args)
            results[side].append(res)
            print(f"round {r + 1} {side:4s}: {res['tok_s']:8.1f} tok/s, peak {res['peak_mb']:7.0f} MiB", flush=True)

    def summary(side):
        rs = results[side]
        return (statistics.median(r["tok_s"] for r in rs), max(r["peak_mb"] for r in rs),
                max(r["peak_mb"] - r["between_mb"] for r in rs))

    ours, peer = summary("ours"), summary("peer")
    what = "peak RSS in training" if not cuda else "peak allocated in training"
    print(f"\nLoRA training, gpt2 124M shapes (random weights), r={RANK} alpha={ALPHA} on c_attn, AdamW, "
          f"batch {args.batch} x {args.seq}, {args.device}")
    print(f"machine: {machine()}; {args.rounds} alternating rounds x {args.steps} timed steps per side\n")
    print(table([
        ["tokens/s (median of rounds)", f"{peer[0]:,.0f}", f"{ours[0]:,.0f}", f"{ours[0] / peer[0]:.2f}x"],
        [f"{what} (MiB)", f"{peer[1]:,.0f}", f"{ours[1]:,.0f}", f"{ours[1] / peer[1]:.2f}x"],
        ["  of which a step's working memory (MiB)", f"{peer[2]:,.0f}", f"{ours[2]:,.0f}", f"{ours[2] / peer[2]:.2f}x"],
    ], ["", "transformers+PEFT", "LoRA Studio", "ratio (ours / peer)"]))


if __name__ == "__main__":
    main()
