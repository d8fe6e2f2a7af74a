"""One shared micro-step for several LoRA training runs on one frozen base (co-batching).

Each run's micro-batch is stacked into one batch, right-padded to the longest sequence (causal
attention never lets a real token see the padding after it). Every run's rows go through its own
adapter only (core.lora.layers.Segments), and the loss is the sum of each run's own mean loss over
its own tokens, divided by its own gradient accumulation. A run's adapter gets gradients from its
rows alone, so each run's gradient is the one it computes alone (up to the rounding of larger
matmuls), whatever its rank, targets, batch size or sequence length.

Padding, not bucketing by length: one forward per step keeps the base's weights read once for all
runs, and a run never waits for others of its length; the padded positions cost compute
(bench/classroom.py prints the share).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from core.device import GUARD, autocast_for
from core.lora.layers import Segment, Segments
from core.model.loss import piece_tokens


class Run(Protocol):
    """What a co-batched step needs from a training run (core.train.trainer.Trainer; core.train.loop steps it)."""

    grad_accum: int  # micro-batches per optimizer step

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # its next (inputs, targets), (B, T)

    def solo_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...  # alone (may be a CUDA graph)

    def segment(self, start: int, length: int) -> Segment: ...  # its rows from `start`, of `length` tokens


def forward_backward(model, runs: Sequence[Run]) -> list[torch.Tensor]:
    """Forward and backward of one micro-batch of every run; each run's mean loss (detached), in order.
    Gradients add into each run's adapter (its accumulation divides them)."""
    cuda = model.device.type == "cuda"
    if len(runs) == 1:  # alone: the run's own loss function (a replayed CUDA graph where it has one)
        run = runs[0]
        x, y = run.draw()
        with GUARD.shared(cuda), autocast_for(model):
            loss = run.solo_loss(x, y)
            (loss / run.grad_accum).backward()
        return [loss.detach()]
    batches = [run.draw() for run in runs]
    T = max(x.shape[1] for x, _ in batches)
    segments, start = [], 0
    for run, (x, _) in zip(runs, batches):
        segments.append(run.segment(start, x.shape[1]))
        start += x.shape[0]
    idx = torch.cat([F.pad(x, (0, T - x.shape[1])) for x, _ in batches])
    # every run's logits live until the one backward: the pieces are sized for the whole step's tokens
    # (a run alone may keep its logits whole; eight of them together may not)
    tokens, vocab = sum(y.numel() for _, y in batches), model.config.vocab_size
    with GUARD.shared(cuda), autocast_for(model):
        h = model.hidden(idx, Segments(segments))
        losses = [model.mean_ce(h[s.start:s.stop, :s.length], y, piece_tokens(y.numel(), vocab, live=tokens))
                  for s, (_, y) in zip(segments, batches)]
        sum(loss / run.grad_accum for run, loss in zip(runs, losses)).backward()
    return [loss.detach() for loss in losses]
