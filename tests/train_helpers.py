"""Training settings small enough for a test, shared by the trainer's test files."""
from __future__ import annotations

from core.train.config import TrainConfig

QUICK = dict(steps=8, lr=1e-2, batch_size=2, seq_len=32, grad_accum=2, eval_interval=4, checkpoint_interval=4,
             seed=3)  # 2 x 32 tokens, 2 micro-steps per step


def quick(**kw) -> TrainConfig:
    """QUICK with `kw` changed."""
    return TrainConfig(**{**QUICK, **kw})


def train_solo(trainer, on_event=None) -> list[dict]:
    """Run `trainer` alone to its end through the one training loop (core.train.loop); its events."""
    from core.train.loop import train_chunk
    return train_chunk(trainer, on_event=on_event).events


def train_to_end(trainer) -> dict:
    """train_solo, for a run that must succeed: its 'done' event (a TrainingError for its 'error' event)."""
    from core.train.trainer import TrainingError
    last = train_solo(trainer)[-1]
    if last["type"] == "error":
        raise TrainingError(last["message"])
    return last
