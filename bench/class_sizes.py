"""How many students' jobs one GPU admits at once, by GPU memory and base model: the training
scheduler's own admission rule (core.train.jobs: every job's activations and LoRA state within 85% of
the memory left beside the shared base) applied to the engine's memory estimate. An estimate, not a
measurement: bench/classroom.py and bench/gpu_check.sh measure on a real card.

    python bench/class_sizes.py [--batch 4] [--seq-len 128] [--rank 8]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.lora.config import LoraConfig  # noqa: E402
from core.model.config import PRESETS  # noqa: E402
from core.train.config import TrainConfig  # noqa: E402
from core.train.estimate import estimate_training, human_bytes  # noqa: E402
from core.train.jobs import GPU_SHARE  # noqa: E402

GPUS = {"T4 / 16 GiB": 16, "L4 / A10G 24 GiB": 24, "A100 40 GiB": 40, "H100 / A100 80 GiB": 80,
        "H200 141 GiB": 141}
# The CUDA context and the decode engine's KV pool sit beside the base before any job starts.
RESERVED_GIB = 1.5


def admitted(gib: float, base: str, lcfg: LoraConfig, tcfg: TrainConfig) -> tuple[int, float, float]:
    """(jobs admitted at once, one job's extra bytes, the base's bytes) on a card of `gib` GiB."""
    cfg = PRESETS[base]
    est = estimate_training(cfg, lcfg, tcfg, "cuda")
    extra = est.activation_bytes + est.lora_bytes
    room = gib * 2**30 - RESERVED_GIB * 2**30 - est.weights_bytes
    return max(0, int(GPU_SHARE * room // extra)), extra, est.weights_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    lcfg = LoraConfig(r=args.rank)
    tcfg = replace(TrainConfig(), batch_size=args.batch, seq_len=args.seq_len)
    bases = list(PRESETS)[:4]
    print(f"jobs of {args.batch} x {args.seq_len}, rank {args.rank} on {','.join(lcfg.targets)}, bf16 base; "
          f"estimated, not measured")
    print("| GPU | " + " | ".join(bases) + " |")
    print("| --- |" + " --- |" * len(bases))
    for gpu, gib in GPUS.items():
        print(f"| {gpu} | " + " | ".join(str(admitted(gib, b, lcfg, tcfg)[0]) for b in bases) + " |")
    sizes = [admitted(80, b, lcfg, tcfg)[1:] for b in bases]
    print("| one job / the base | " + " | ".join(f"{human_bytes(e)} / {human_bytes(w)}" for e, w in sizes) + " |")


if __name__ == "__main__":
    main()
