"""The Train tab on ZeroGPU (and its simulation): the jobs of core's Runs train in chunks, each one GPU call, driven by
the owner's open page (studio.zerogpu_jobs.ChunkedRuns) instead of the scheduler's training thread.

`ChunkScheduler` is the Runs' scheduler there: Start, Resume and Stop go through core's Runs as on any studio
(the same checks, run names reserved in the library, per-user and per-address limits, ownership), and each
submitted job becomes a chunked run instead of joining a shared step. A job is a core TrainJob all the same: each
chunk's events are folded into it (TrainJob.on_event), so the job card, the chart and the jobs table read it as
they read any job. A job whose page went away shows as 'paused' until its owner presses Resume.
"""
from __future__ import annotations

import threading
import time

from core.api import ChunkJob, JobSpec, TrainJob, TrainScheduler

from .zerogpu_jobs import ChunkedRuns

ENDED = ("finished", "stopped", "failed")


class ChunkScheduler(TrainScheduler):
    """A TrainScheduler whose jobs run as chunked runs: no training thread, no queue (a job is 'running' from
    its submit until it ends); `tick` (the Train tab's timer) runs the next chunk of the page owner's job."""

    @classmethod
    def for_engine(cls, engine, load_base=None, **kw) -> "ChunkScheduler":
        scheduler = super().for_engine(engine, load_base, **kw)
        scheduler.runs = ChunkedRuns(engine)
        return scheduler

    def _loop(self) -> None:
        """No training thread: the owner's page drives each job."""

    def submit(self, spec: JobSpec) -> TrainJob:
        job = super().submit(spec)  # the per-user limit, a full queue, a run already training
        with self._cond:
            self._queue.remove(job)
            self._running.append(job)
            self._update_positions()
        try:
            job.model = self._load_base(spec)  # pinned in this process (on the CPU) while the job lives
        except BaseException:
            with self._cond:
                self._running.remove(job)
            raise
        job._touch(state="starting", started=job.started or time.time())
        chunk_job = ChunkJob(spec.dataset, spec.lcfg, spec.tcfg, spec.adapter or spec.name, str(spec.out_dir),
                             spec.meta)
        job.chunked = self.runs.start(chunk_job, spec.user, state=spec.resume)
        job.folded, job.elapsed_base = 0, 0.0
        job.fold_lock = threading.Lock()
        return job

    def running_base(self) -> str | None:
        with self._cond:
            return next((j.spec.base_id for j in self._running if j.state != "paused"), None)

    def stop(self, job: TrainJob, by: str | None = None) -> str:
        """Stop a job: it is saved now (one GPU call), or at the end of the chunk in its GPU call."""
        if job not in self._live():
            return f"'{job.name}' is not running."
        reason = "" if by is None else f"stopped by the teacher{f' ({by})' if by else ''}"
        job.request_stop(reason, by)
        if job.model is None and job.chunked.state is not None:
            job.model = self._load_base(job.spec)  # a paused run's base, for the GPU call that saves it
        self._drive(job, lambda run: self.runs.stop(run.id, run.owner))
        if job.live or job.state == "paused":
            return f"Stopping '{job.name}': it is saved at the end of the chunk it is training."
        return f"Stopped '{job.name}' at step {job.progress.get('step', 0)}; it is saved to the library."

    def tick(self, job_id, owner: str | None) -> None:
        """The Train tab's timer: the next chunk of the followed job if it is `owner`'s, else of `owner`'s newest
        running job (another user's page drives nothing). First, every page's tick pauses the runs that no page
        drove for a while."""
        for other in self._live():
            run = other.chunked
            if run.status == "running" and not run.busy and self.runs.clock() - run.last_tick > self.runs.idle_s:
                self.runs.pause(run.id, run.owner)
                self._fold(other)
        mine = [j for j in self._live() if owner is not None and j.user == owner]
        job = next((j for j in mine if str(j.id) == str(job_id)), None) or max(mine, key=lambda j: j.id, default=None)
        if job is not None:
            self._drive(job, lambda run: self.runs.tick(run.id, owner))

    def paused(self, name: str | None, job_id, owner: str | None) -> TrainJob | None:
        """`owner`'s paused job training run `name` (or, without a name, job `job_id`)."""
        return next((j for j in self._live() if j.state == "paused" and j.user == owner
                     and (j.name == name if name else str(j.id) == str(job_id))), None)

    def resume(self, job: TrainJob) -> str:
        if job.model is None:
            job.model = self._load_base(job.spec)  # refused while jobs on another base run
        self.runs.resume(job.chunked.id, job.user)
        job._touch(state="stopping" if job.chunked.stopping else "running")
        return f"Resumed **{job.name}** at step {job.progress.get('step', 0)}. Keep this page open: it trains it."

    def _drive(self, job: TrainJob, act) -> None:
        """act(run) (a tick or a stop, which may run a GPU call), then the new events folded into the job."""
        try:
            act(job.chunked)
        except Exception as e:  # noqa: BLE001 - the chunk did not happen; the next tick tries again
            note = f"a GPU call failed ({e}); the next chunk tries again."
            if not job.notes or job.notes[-1] != note:
                job.on_event({"type": "info", "message": note})
        self._fold(job)

    def _fold(self, job: TrainJob) -> None:
        run = job.chunked
        with job.fold_lock:
            events, job.folded = run.events[job.folded:], len(run.events)
            final = None
            for ev in events:
                if ev["type"] == "start":  # a chunk's worker counts its own seconds: the card counts the run's
                    job.elapsed_base = job.progress.get("elapsed") or 0.0
                elif ev["type"] == "step" and isinstance(ev.get("elapsed"), (int, float)):
                    ev = {**ev, "elapsed": job.elapsed_base + ev["elapsed"]}
                if ev["type"] in ("done", "error"):
                    final = ev  # reported after the cleanup, as the training thread does
                else:
                    job.on_event(ev)
            if run.status == "paused" and job.state != "paused":
                job._touch(state="paused")
                self._release_base(job.model)  # a paused run holds no base: others may switch it meanwhile
                job.model = None
            if run.status not in ENDED or job not in self._live():
                return
            with self._cond:
                self._running.remove(job)
                self._update_positions()
            if job.model is not None:
                self._release_base(job.model)
            self._end(job, final or {"type": "error", "kind": "cancelled", "step": job.progress.get("step", 0),
                                     "checkpoint": None, "message": "stopped before its first chunk; nothing was "
                                                                    "trained."})
