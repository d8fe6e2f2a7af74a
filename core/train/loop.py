"""The one training loop: `TrainLoop` steps one or more training runs (core.train.trainer.Trainer) on a
frozen base, one shared micro-batch at a time.

- A run alone (the CLI, a test, a ZeroGPU chunk) is a loop of one run.
- The studio's co-batched jobs are a loop of several (core.train.jobs.TrainScheduler): each keeps its own
  optimizer, schedule, data order and dropout RNG, and the step's loss is the sum of each run's own mean
  loss (core.train.cobatch), so a run co-batched trains as it does alone.
- torchrun is a loop of one run on every rank with the group's hooks (core.train.distributed.Group):
  each rank draws its shard of the global micro-batch, the gradients are all-reduced before the
  optimizer step, and the ranks agree on Stop.

A run's own work between micro-batches (opening with its first validation, a validation on its cadence)
comes as chunks (its event generators yield None after each chunk, core.train.evaluate): the run sits
out the shared micro-steps while it does it, one chunk per `step`, so one job's validation does not
stall the others' training, and on a shared base each `step` stays one bounded unit of the work loop.

Failures are handled here, once, the same way for every driver:
- Stop (a run's flag, from any thread): checked before every micro-batch; a partial optimizer step is
  dropped and its batches rewound, the adapter and a resume point are saved ('done', stopped).
- Out of memory in the shared micro-step: alone, the run ends with an 'error' event (kind 'oom', its
  last checkpoint kept); with others, the newest run's micro-batch is taken back and the run leaves
  (`step` returns it; it continues exactly where it was when it joins again).
- A non-finite loss or gradient: that run ends with an 'error' event (kind 'nan').
- An error in a run's own work between micro-batches (an evaluation, a checkpoint on a full disk):
  that run ends with an 'error' event (kind 'disk' or 'internal'); the others go on untouched.
- Any other error in the shared micro-step is raised, after the runs of the step have left.

Chunked running (`train_chunk`): a run steps for at most N optimizer steps or N seconds, then returns
its whole state as a picklable TrainState, which `Trainer(resume=state)` continues exactly, in this
process or another (ZeroGPU runs each chunk in a fresh forked worker).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from core.device import is_oom
from core.train.cobatch import forward_backward


class Hooks:
    """What a loop asks of the processes a run spans; these are one process's answers (core.train.distributed's
    Group gives torchrun's)."""

    fatal: tuple = ()  # errors that end the whole loop, never one run (torchrun: a lost rank)

    def agree_stop(self, flag: bool) -> bool:
        """Whether the run stops now, given this process's stop flag."""
        return flag


SOLO = Hooks()


class TrainLoop:
    """The runs training together on one base now (oldest first), stepped one shared micro-batch at a time.

    A run joins with `join` (its start events and first evaluation) and leaves when it finishes, is
    stopped, fails, or is pushed out by an out-of-memory error (the module's rules). Each run's events go
    to its own `emit`. `run` steps until the runs have ended (or `until` says so between optimizer steps).
    """

    def __init__(self, model, hooks: Hooks = SOLO):
        self.model = model
        self.hooks = hooks
        self.runs: list = []  # trainers (core.train.trainer.Trainer) in the shared micro-steps, oldest first
        self.busy: dict[int, tuple] = {}  # id -> (run, its events still to come): doing its own work in chunks
        self._emit: dict[int, Callable[[dict], None]] = {}
        self._joined: dict[int, int] = {}  # id -> when it joined: the shared step keeps runs oldest first
        self._count = 0

    def join(self, run, emit: Callable[[dict], None]) -> None:
        """Set `run` up now (an error is raised: whoever starts it reports it), then open it (start events,
        first validation, in chunks: see the module) and add it to the shared micro-steps once that is done;
        an error while it opens ends it with an 'error' event."""
        run.setup()
        self._emit[id(run)] = emit
        self._count += 1
        self._joined[id(run)] = self._count
        self.busy[id(run)] = (run, run.open())

    def rejoin(self, run, emit: Callable[[dict], None]) -> None:
        """Add back a run that an out-of-memory error pushed out (it goes on exactly where it was)."""
        self._emit[id(run)] = emit
        self._count += 1
        self._joined[id(run)] = self._count
        self.runs.append(run)

    def leave(self, run) -> None:
        if run in self.runs:
            self.runs.remove(run)
        self.busy.pop(id(run), None)
        self._emit.pop(id(run), None)
        self._joined.pop(id(run), None)

    @property
    def live(self) -> bool:
        """Whether any run is stepping or busy with its own work."""
        return bool(self.runs or self.busy)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Step until every run has ended, or until `until()` is true at a moment when every run is between
        two optimizer steps. A run pushed out by an out-of-memory error joins again when another ends."""
        waiting, room = [], 0  # pushed-out runs with their emit; how many runs fit the step
        while self.live or waiting:
            if waiting and len(self.runs) < room:
                self.rejoin(*waiting.pop(0))
            if until is not None and not self.busy and all(r.between_steps for r in self.runs) and until():
                return
            crowd = len(self.runs)
            emits = dict(self._emit)
            pushed = self.step()
            if pushed:
                room = crowd - len(pushed)
                waiting += [(r, emits[id(r)]) for r in pushed]

    def step(self) -> list:
        """One chunk of each busy run's own work, then one shared micro-step of the others. Returns the runs
        pushed out by an out-of-memory error (their state is as before the step; join them again later). An
        unexpected error is raised, after the runs of the step have left (their state is unknown)."""
        for run in list(self.runs):
            if self.hooks.agree_stop(run.stop.is_set()):
                run.stop.set()
                self._send(run, run.stopped())
        runs = list(self.runs)  # a busy run that finishes its work below steps from the next step on
        for run, events in list(self.busy.values()):
            self._send(run, events)
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
        """Emit `run`'s events as they come, up to the end of the next chunk of its own work (a None): then it
        is busy until a later `step` goes on from there. An error in its work between micro-batches (an
        evaluation, a checkpoint, the adapter's save) ends that run alone, with its message: the runs after
        it in the step still get their own bookkeeping, so none counts a micro-batch twice."""
        emit = self._emit[id(run)]
        try:
            for ev in events:
                if ev is None:  # a chunk of its own work is done: the rest waits for the next step
                    if run in self.runs:
                        self.runs.remove(run)
                    self.busy[id(run)] = (run, events)
                    return
                emit(ev)
        except self.hooks.fatal:
            raise
        except Exception as e:  # noqa: BLE001 - this run's failure, reported as its last event
            emit(run.failed(e))
        if self.busy.pop(id(run), None) is not None and run.outcome is None:
            self.runs.append(run)  # its own work is done: back in the shared micro-steps, in join order
            self.runs.sort(key=lambda r: self._joined[id(r)])
        if run.outcome is not None:
            self.leave(run)


# ---- chunked running --------------------------------------------------------------------------------

@dataclass
class Chunk:
    """What one call of train_chunk did."""
    events: list = field(default_factory=list)  # the run's events in this chunk, in order (plain dicts)
    state: object = None  # a core.train.trainer.TrainState to continue from; None once the run has ended
    outcome: str | None = None  # None (more to do), or 'finished', 'stopped' or 'failed' (see events[-1])


def train_chunk(trainer, max_steps: int | None = None, max_seconds: float | None = None,
                on_event: Callable[[dict], None] | None = None) -> Chunk:
    """Train `trainer` (a Trainer, new or made with resume=<a TrainState>) alone for at most `max_steps`
    optimizer steps and about `max_seconds` (after its first step, none is begun that the slowest step so
    far says would end past it), or to its end. Returns its events and, unless it ended, its state as a TrainState.
    Stop (trainer.stop set) ends the run as anywhere: saved, with a resume point on disk."""
    chunk = Chunk()

    def emit(ev: dict) -> None:
        chunk.events.append(ev)
        if on_event is not None:
            on_event(ev)

    loop = TrainLoop(trainer.model)
    loop.join(trainer, emit)
    t0 = last = time.perf_counter()
    first, slowest = None, 0.0  # the step it starts from, known once it has opened (a resumed run's)

    def enough() -> bool:
        nonlocal last, slowest, first
        now = time.perf_counter()
        first = trainer.step if first is None else first
        if trainer.step > first:
            slowest = max(slowest, now - last)
        last = now
        done = trainer.step - first
        return (max_steps is not None and done >= max_steps) or (  # at least one step: every chunk makes progress
            max_seconds is not None and done > 0 and now - t0 + slowest > max_seconds)

    loop.run(until=enough)
    chunk.outcome = trainer.outcome
    if trainer.outcome is None:
        chunk.state = trainer.state()
    return chunk
