"""Training on ZeroGPU: a run goes in chunks, each one GPU call of at most `chunk_s` seconds of training
(core.zerogpu_calls.GpuCalls.train_chunk), its whole state kept here between chunks. No thread owns the GPU:
the Train tab's timer drives the next chunk while the page is open (`tick`), so a page that stops ticking
(closed) stops the run; after `idle_s` without a tick it shows as paused, and `resume` (the Train tab's
Resume) lets ticks drive it again from where it was. Checkpoints are on disk as in any run.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

CHUNK_S = 40  # training seconds per GPU call: ZeroGPU's default call is 60 s, the rest is the worker's set-up
IDLE_S = 30  # no tick from the page for this long (the timer ticks every few seconds): the run pauses


@dataclass
class ChunkedRun:
    id: int
    owner: str | None
    job: object  # core.zerogpu_calls.ChunkJob
    state: object = None  # core.train.trainer.TrainState between chunks (None before the first one)
    status: str = "running"  # running, paused, finished, stopped, failed
    events: list = field(default_factory=list)  # every chunk's events, in order
    chunks: int = 0
    last_tick: float = 0.0
    busy: bool = False  # a chunk is in its GPU call
    stopping: bool = False  # Stop was pressed: the next chunk saves the run and ends it


class ChunkedRuns:
    def __init__(self, engine, chunk_s: float = CHUNK_S, idle_s: float = IDLE_S, clock=time.monotonic):
        self.engine, self.chunk_s, self.idle_s, self.clock = engine, chunk_s, idle_s, clock
        self._runs: dict[int, ChunkedRun] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, job, owner: str | None = None, state=None) -> ChunkedRun:
        """A new run; its first chunk goes at the page's next tick. state: where it starts (a checkpoint of a
        stopped run it continues; None: from the start)."""
        with self._lock:
            run = ChunkedRun(next(self._ids), owner, job, state, last_tick=self.clock())
            self._runs[run.id] = run
            return run

    def get(self, run_id: int, owner: str | None = None) -> ChunkedRun:
        """Run `run_id`, for its owner only (a run started without one is anyone's)."""
        run = self._runs.get(run_id)
        if run is None or run.owner is not None and owner != run.owner:
            raise ValueError(f"there is no training run {run_id!r} here; start one on the Train tab.")
        return run

    def tick(self, run_id: int, owner: str | None = None) -> ChunkedRun:
        """The page is open: run the next chunk of a running run (in this call, so ZeroGPU charges the
        visitor whose page asks), unless one is in its GPU call already or the page was away too long."""
        with self._lock:
            run = self.get(run_id, owner)
            now = self.clock()
            if run.status == "running" and now - run.last_tick > self.idle_s:
                run.status = "paused"  # nobody watched: it waits for Resume
            run.last_tick = now
            if run.status != "running" or run.busy:
                return run
            run.busy = True
        return self._chunks(run)

    def stop(self, run_id: int, owner: str | None = None) -> ChunkedRun:
        """End a running or paused run: saved now (a GPU call that only saves), or by the chunk in its GPU
        call when it returns. A run stopped before its first chunk trained nothing and saves nothing."""
        with self._lock:
            run = self.get(run_id, owner)
            if run.status not in ("running", "paused"):
                return run
            run.stopping = True
            if run.busy:
                return run
            if run.state is None:
                run.status = "stopped"
                return run
            run.status, run.busy = "running", True
        return self._chunks(run)

    def _chunks(self, run: ChunkedRun) -> ChunkedRun:
        """(run.busy is set.) The next chunk in a GPU call; and the saving one when Stop came meanwhile."""
        while True:
            stop = run.stopping
            try:
                chunk = self.engine.gpu_calls.train_chunk(self.engine, run.job, run.state, self.chunk_s, stop)
            except Exception:
                with self._lock:
                    run.busy = False
                raise  # this chunk did not happen: the state is the one before it, the next tick tries again
            with self._lock:
                run.last_tick = self.clock()
                run.events.extend(chunk.events)
                run.chunks += 1
                run.state = chunk.state
                if chunk.state is None:
                    run.status = chunk.outcome or "finished"
                if run.state is None or stop or not run.stopping:
                    run.busy = False
                    return run

    def resume(self, run_id: int, owner: str | None = None) -> ChunkedRun:
        """A paused run runs again at the next tick."""
        with self._lock:
            run = self.get(run_id, owner)
            if run.status == "paused":
                run.status, run.last_tick = "running", self.clock()
            return run

    def pause(self, run_id: int, owner: str | None = None) -> ChunkedRun:
        with self._lock:
            run = self.get(run_id, owner)
            if run.status == "running":
                run.status = "paused"
            return run
