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

from core.device import GUARD, autocast_for, is_oom
from core.lora.layers import Segment, Segments
from core.train.estimate import loss_chunk


class Run(Protocol):
    """What a co-batched step needs from a training run (core.train.trainer.Trainer)."""

    grad_accum: int  # micro-batches per optimizer step

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # its next (inputs, targets), (B, T)

    def solo_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...  # alone (may be a CUDA graph)

    def segment(self, start: int, length: int) -> Segment: ...  # its rows from `start`, of `length` tokens

    @property
    def loss_chunk(self) -> int: ...  # tokens per piece of its chunked loss


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
    tokens = sum(y.numel() for _, y in batches)
    chunk = max(max(run.loss_chunk for run in runs), loss_chunk(tokens, model.config.vocab_size))
    with GUARD.shared(cuda), autocast_for(model):
        h = model.hidden(idx, Segments(segments))
        losses = [model.mean_ce(h[s.start:s.stop, :s.length], y, chunk) for s, (_, y) in zip(segments, batches)]
        sum(loss / run.grad_accum for run, loss in zip(runs, losses)).backward()
    return [loss.detach() for loss in losses]


class CoTrainer:
    """The runs training together on one base now, stepped one shared micro-batch at a time.

    A run joins with `join` (its start events and first evaluation) and leaves when it finishes, is
    stopped, fails (a non-finite loss, or an error in its own work after a step such as a checkpoint on a
    full disk: the others go on, untouched) or is pushed out by an out-of-memory error
    (the newest run: its micro-batch is taken back so it can rejoin later exactly where it was). Each
    run's events go to its own `emit`. A training run alone is this with one run (Trainer.run).
    """

    def __init__(self, model):
        self.model = model
        self.runs: list = []  # trainers (core.train.trainer.Trainer), oldest first
        self._emit: dict[int, callable] = {}

    def join(self, run, emit) -> None:
        """Open `run` (set up, start events, first validation) and add it from the next step on."""
        self._emit[id(run)] = emit
        for ev in run.open():
            emit(ev)
        if run.outcome is None:
            self.runs.append(run)
        else:
            self.leave(run)

    def rejoin(self, run, emit) -> None:
        """Add back a run that an out-of-memory error pushed out (it goes on exactly where it was)."""
        self._emit[id(run)] = emit
        self.runs.append(run)

    def leave(self, run) -> None:
        if run in self.runs:
            self.runs.remove(run)
        self._emit.pop(id(run), None)

    def step(self) -> list:
        """One shared micro-step. Returns the runs pushed out by an out-of-memory error (their state
        is as before the step; join them again later). An unexpected error is raised, after the runs
        of the step have left (their state is unknown)."""
        for run in [r for r in self.runs if r.stop.is_set()]:
            self._send(run, run.stopped())
        runs = list(self.runs)
        if not runs:
            return []
        marks = [run.mark() for run in runs] if len(runs) > 1 else None
        for run in runs:
            run.begin_micro()
        try:
            losses = forward_backward(self.model, runs)
        except Exception as e:
            if not is_oom(e):
                for run in runs:
                    run.abort()
                    self.leave(run)
                raise
            if marks is None:  # alone: the run ends with the out-of-memory message
                self._emit[id(runs[0])](runs[0].out_of_memory())
                self.leave(runs[0])
                return []
            for run, mark in zip(runs, marks):
                run.undo(mark)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.leave(runs[-1])
            return [runs[-1]]
        for run, loss in zip(runs, losses):
            self._send(run, run.end_micro(loss))
        return []

    def _send(self, run, events) -> None:
        """Emit `run`'s events as they come. An error in its work between micro-batches (an evaluation, a
        checkpoint, the adapter's save) ends that run alone, with its message: the runs after it in the
        step still get their own bookkeeping, so none counts a micro-batch twice."""
        emit = self._emit[id(run)]
        try:
            for ev in events:
                emit(ev)
        except Exception as e:  # noqa: BLE001 - this run's failure, reported as its last event
            emit(run.failed(e))
        if run.outcome is not None:
            self.leave(run)
