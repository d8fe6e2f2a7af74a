"""Training settings small enough for a test, shared by the trainer's test files."""
from __future__ import annotations

from core.train.config import TrainConfig

QUICK = dict(steps=8, lr=1e-2, batch_size=2, seq_len=32, grad_accum=2, eval_interval=4, checkpoint_interval=4,
             seed=3)  # 2 x 32 tokens, 2 micro-steps per step


def quick(**kw) -> TrainConfig:
    """QUICK with `kw` changed."""
    return TrainConfig(**{**QUICK, **kw})
