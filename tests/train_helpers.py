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


def loss_alone(model, name, ids, seq_len: int, windows: int | None = None, mask=None) -> tuple[float, int]:
    """(mean next-token loss, tokens) of one model (an adapter name, None = the base) over the windows an
    evaluation reads (`windows` at most; default as many as EVAL_TOKENS allows), one window at a time
    through the model's own training loss: the reference a batched, chunked evaluation must equal."""
    import numpy as np
    import torch

    from core.model.loss import IGNORE
    from core.train.data import eval_windows, masked_targets
    from core.train.evaluate import EVAL_TOKENS
    n = windows or max(1, EVAL_TOKENS // seq_len)
    ws = eval_windows(np.asarray(ids), seq_len, n)
    ms = eval_windows(np.asarray(mask), seq_len, n) if mask is not None else [None] * len(ws)
    total, count = 0.0, 0
    with torch.no_grad():
        for w, m in zip(ws, ms):
            x, y = torch.tensor(w[None, :-1].astype(np.int64)), torch.tensor(w[None, 1:].astype(np.int64))
            if m is not None:
                y = masked_targets(y, m[None, 1:] > 0)
            k = int((y != IGNORE).sum())
            if k:
                total += float(model.loss(x, y, name, chunk=0)) * k
                count += k
    return total / max(1, count), count
