"""LoRA training throughput and peak memory: this engine vs transformers + PEFT, same machine, one run.

Both sides load the same random gpt2-shaped (124M) checkpoint written by transformers, train a
rank-8 alpha-16 LoRA on c_attn with AdamW (lr 3e-4, clip 1.0) on the same random batches, and
compute the same loss (cross entropy over every position). This engine runs through its real
training loop (core.train.trainer.Trainer, step times from its events); the peer runs the plain loop
PEFT users write. Throughput: both sides in one process, one step each in turn (ABBA), so changing
load on the machine hits both alike; tokens/s = batch x seq / the median step time. Memory: each
side alone in its own process.

Peak memory over a few steps after a warmup step: CPU = the process's
peak resident set (VmHWM), CUDA = torch.cuda.max_memory_allocated; both include the weights. A step's
working memory = that peak minus what is held between steps (weights, optimizer state, libraries).

    python bench/train.py                                 # CPU, the seed's micro-batch 4 x 128
    python bench/train.py --device cuda --batch 16 --seq 1024
    python bench/train.py --dora                          # also DoRA, ours and PEFT's, in the same ABBA rotation
    python bench/train.py --bf16                          # also ours with the frozen base in bf16 (--precision bf16)
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
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


# ---- the two sides: generators that run one training step per next() and yield its time ------

def steps_ours(ckpt, device, batch, seq, total, dora=False, dtype=None):
    """This engine's real loop (core.train.loop.TrainLoop); step times come from its 'step' events.
    dtype: the frozen base's (None: the device's default, fp32 on CPUs)."""
    from core.lora.config import LoraConfig
    from core.train.config import TrainConfig
    from core.train.data import Dataset
    from core.train.loop import TrainLoop
    from core.train.trainer import Trainer
    from core.model.weights import load_base

    model = load_base(str(ckpt), device, dtype)
    ids = tokens()
    tcfg = TrainConfig(steps=total, lr=LR, warmup_steps=0, batch_size=batch, seq_len=seq, grad_accum=1,
                       grad_clip=CLIP, weight_decay=0.01, eval_interval=0, checkpoint_interval=0)
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    trainer = Trainer(model, Dataset(train=ids, val=ids[: seq + 1]),
                      LoraConfig(r=RANK, alpha=ALPHA, targets=("attn.c_attn",), use_dora=dora), tcfg, "bench",
                      out / "run")
    try:
        loop, times = TrainLoop(model), []
        loop.join(trainer, lambda ev: ev["type"] == "step" and times.append(ev["step_time"]))
        while loop.live:
            loop.step()
            while times:
                yield times.pop(0)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def steps_peer(ckpt, device, batch, seq, total, dora=False):
    """transformers GPT2LMHeadModel + PEFT get_peft_model, the plain loop PEFT users write."""
    import transformers
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = transformers.GPT2LMHeadModel.from_pretrained(ckpt, dtype=dtype, attn_pdrop=0.0, resid_pdrop=0.0,
                                                         embd_pdrop=0.0).to(device)
    model = get_peft_model(model, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["c_attn"],
                                                 fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 use_dora=dora))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=device.type == "cuda" or None)
    ids = tokens()
    rng = np.random.default_rng(1337)
    for _ in range(total):
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
        yield time.perf_counter() - t0


SIDES = {"ours": steps_ours, "peer": steps_peer}
DORA_SIDES = {"ours-dora": lambda *a: steps_ours(*a, dora=True), "peer-dora": lambda *a: steps_peer(*a, dora=True)}
BF16_SIDES = {"ours-bf16": lambda *a: steps_ours(*a, dtype=torch.bfloat16)}
ALL_SIDES = {**SIDES, **DORA_SIDES, **BF16_SIDES}


def speed_worker(args, device) -> dict:
    """Both sides in this process, one step each in turn (ABBA order), so load on the machine hits both alike."""
    total = args.warmup + args.steps
    sides = {**SIDES, **(DORA_SIDES if args.dora else {}), **(BF16_SIDES if args.bf16 else {})}
    gens = {side: fn(args.ckpt, device, args.batch, args.seq, total) for side, fn in sides.items()}
    times = {side: [] for side in sides}
    for i in range(total):
        for side in (list(sides) if i % 2 == 0 else list(sides)[::-1]):
            times[side].append(next(gens[side]))
    for g in gens.values():
        g.close()
    return {side: args.batch * args.seq / statistics.median(t[args.warmup:]) for side, t in times.items()}


def memory_worker(args, device) -> dict:
    """One side alone in this process: peak memory over `mem_steps` steps after one warmup step."""
    gen = ALL_SIDES[args.worker[4:]](args.ckpt, device, args.batch, args.seq, 1 + args.mem_steps)
    next(gen)
    between = reset_peak(device)
    for _ in range(args.mem_steps):
        next(gen)
    peak = peak_mb(device)
    gen.close()
    return {"peak_mb": peak, "step_mb": peak - between}


def worker(args) -> None:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = speed_worker if args.worker == "speed" else memory_worker
    print(json.dumps(fn(args, device)))


# ---- the driver ---------------------------------------------------------------------

def spawn(worker_kind, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker_kind, "--ckpt", str(args.ckpt), "--device", args.device,
           "--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--mem-steps", str(args.mem_steps)]
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--dora"] if args.dora else []
    cmd += ["--bf16"] if args.bf16 else []
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"{worker_kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 8 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2 on CPU, 5 on CUDA)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps in each memory measurement (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dora", action="store_true", help="also time DoRA training (ours and PEFT's) in the same run")
    p.add_argument("--bf16", action="store_true",
                   help="also time ours with the frozen base in bf16 (LoRA fp32) in the same run, and its memory")
    p.add_argument("--worker", choices=["speed", "mem-ours", "mem-peer", "mem-ours-bf16"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (30 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    if args.worker:
        return worker(args)

    args.ckpt = random_hf_checkpoint()  # gpt2 124M shapes, random weights, written by transformers
    try:
        speed = spawn("speed", args)
        mem = {side: spawn(f"mem-{side}", args) for side in (*SIDES, *(BF16_SIDES if args.bf16 else {}))}
    finally:
        shutil.rmtree(args.ckpt, ignore_errors=True)
    what = "peak RSS" if not cuda else "peak allocated"
    print(f"LoRA training, gpt2 124M shapes (random weights), r={RANK} alpha={ALPHA} on c_attn, AdamW lr {LR:g}, "
          f"clip {CLIP:g}, batch {args.batch} x {args.seq}, {args.device}")
    print(f"machine: {machine()}; tokens/s from the median of {args.steps} alternating steps per side "
          f"after {args.warmup} warmup steps; memory from separate processes\n")
    ours, peer = mem["ours"], mem["peer"]
    print(table([
        ["training tokens/s", f"{speed['peer']:,.0f}", f"{speed['ours']:,.0f}",
         f"{speed['ours'] / speed['peer']:.2f}x"],
        [f"{what} while training (MiB)", f"{peer['peak_mb']:,.0f}", f"{ours['peak_mb']:,.0f}",
         f"{ours['peak_mb'] / peer['peak_mb']:.2f}x"],
        ["  of it, a step's working memory (MiB)", f"{peer['step_mb']:,.0f}", f"{ours['step_mb']:,.0f}",
         f"{ours['step_mb'] / peer['step_mb']:.2f}x"],
    ], ["", "transformers+PEFT", "LoRA Studio", "ours / peer"]))
    if args.bf16:
        b = mem["ours-bf16"]
        print(f"\nbf16 base (LoRA and optimizer fp32) on the same rotation: tokens/s {speed['ours-bf16']:,.0f} "
              f"({speed['ours-bf16'] / speed['peer']:.2f}x the peer in fp32, {speed['ours-bf16'] / speed['ours']:.2f}x "
              f"ours in fp32); {what} {b['peak_mb']:,.0f} MiB ({b['peak_mb'] / ours['peak_mb']:.2f}x ours in fp32)")
    if args.dora:
        print(f"\nDoRA (use_dora) on the same rotation: tokens/s {speed['peer-dora']:,.0f} transformers+PEFT, "
              f"{speed['ours-dora']:,.0f} LoRA Studio ({speed['ours-dora'] / speed['peer-dora']:.2f}x); "
              f"DoRA / plain LoRA: ours {speed['ours-dora'] / speed['ours']:.2f}x, "
              f"PEFT {speed['peer-dora'] / speed['peer']:.2f}x")


if __name__ == "__main__":
    main()
