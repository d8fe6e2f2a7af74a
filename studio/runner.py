"""The studio's side of training: every user's jobs, co-batched by core's TrainScheduler.

The scheduler (core.train.jobs) runs the jobs: one shared step for all jobs on the loaded base, a
queue, jobs on another base waiting. The runner adds what the studio knows: run names reserved in
the library, the memory check before anything loads, who owns a job (the signed-in user, else the
browser), and the per-user view a page polls (`snapshot`, `table`). A job's report is folded in
core (TrainJob.snapshot) with a version, so a page redraws only when something changed and a
reloaded page reattaches to it.
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from core.api import (PRESETS, Dataset, JobSpec, LoraConfig, TrainConfig, TrainJob, TrainScheduler, check_memory,
                      check_name, default_dtype, estimate_training, find_checkpoint, make_trackers, precision_name,
                      train_scheduler, training_adapter)


def _run_meta(name: str, user: str | None) -> dict:
    """What the studio records in studio.json of a run's adapter and checkpoints beyond the trainer's
    own: the run's library name (not its internal 'train:' name) and the signed-in user."""
    return {"name": name, **({"user": user} if user else {})}


class Runner:
    """Every training job of this process. engine: the shared core.engine.Engine; load_base(base_id):
    the base a starting job trains on, loaded and pinned (Studio.base(..., pin=True)); the scheduler
    releases the pin when the job ends."""

    def __init__(self, engine, load_base: Callable[[str], object], max_jobs_per_user: int = 1,
                 capacity_tokens: int | None = None, max_job_tokens: int | None = None,
                 users_per_address: int = 1, max_job_steps: int | None = None,
                 max_job_minutes: float | None = None, scheduler: type[TrainScheduler] = TrainScheduler):
        self.engine = engine
        self.max_job_tokens = max_job_tokens  # a job's steps x tokens per step at most (None: no limit)
        self.max_job_steps = max_job_steps  # a job's optimizer steps at most (None: no limit)
        self.users_per_address = users_per_address  # without sign-in, an address's jobs: this x the per-user limit
        self._submitting = threading.Lock()  # the per-address check and the submit it allows, as one
        self._addresses: dict[int, str] = {}  # live job id -> the client address that asked (without sign-in)
        self.scheduler = train_scheduler(engine, load_base, scheduler, capacity_tokens=capacity_tokens,
                                         max_jobs_per_user=max_jobs_per_user,
                                         max_job_minutes=max_job_minutes)

    # ---- queries -------------------------------------------------------------------------

    def jobs(self) -> list[TrainJob]:
        """Running, then queued (in order), then recently ended jobs."""
        return self.scheduler.jobs()

    @property
    def job(self) -> TrainJob | None:
        """The newest job (the one a page without a choice follows)."""
        jobs = self.jobs()
        return max(jobs, key=lambda j: j.id) if jobs else None

    def busy(self) -> TrainJob | None:
        """The newest job still queued or training, if any."""
        live = self.scheduler.live()
        return max(live, key=lambda j: j.id) if live else None

    def training(self, name: str) -> TrainJob | None:
        """The live job training run `name`, if any."""
        return next((j for j in self.scheduler.live() if j.name == name), None)

    def find(self, job_id, owner: str | None = None) -> TrainJob | None:
        """Job `job_id`; without one, the newest job of `owner` (or the newest of all)."""
        jobs = self.jobs()
        if job_id not in (None, ""):
            return next((j for j in jobs if str(j.id) == str(job_id)), None)
        mine = [j for j in jobs if owner is not None and j.user == owner]
        pool = mine or jobs
        return max(pool, key=lambda j: j.id) if pool else None

    def snapshot(self, job_id=None, owner: str | None = None) -> dict | None:
        job = self.find(job_id, owner)
        if job is None:
            return None
        snap = job.snapshot()
        snap["start_eta"] = self.scheduler.eta_to_start(job)
        return snap

    def check_memory(self, base_id: str, dataset: Dataset, lcfg: LoraConfig, tcfg: TrainConfig) -> None:
        """Before a job is queued: refuse settings whose estimated peak exceeds --max-train-memory or the
        memory available (MemoryLimitError); the trainer checks again on the loaded base."""
        engine, cfg = self.engine, PRESETS[base_id]
        seq_len, _ = dataset.block_size(tcfg.seq_len)
        loaded = engine.model is not None and engine.base_id == base_id
        # the base as --precision loads it: the Train tab's estimate counts the same bytes
        weights = precision_name(engine.dtype or default_dtype(engine.device))
        est = estimate_training(cfg, lcfg, replace(tcfg, seq_len=seq_len), engine.device.type, weights=weights)
        check_memory(est, engine.device, engine.max_train_memory, loaded=loaded,
                     advice=f"lower the batch size (now {tcfg.batch_size}), the sequence length (now {seq_len}) "
                            f"or the rank (now {lcfg.r}); gradient accumulation keeps the effective batch at "
                            f"no memory cost")

    def check_budget(self, dataset: Dataset, tcfg: TrainConfig, done: int = 0) -> None:
        """Before a job is queued: refuse one whose steps (beyond `done`) exceed --max-job-steps, or whose
        steps x tokens per step exceed --max-job-tokens, in one sentence with the most steps allowed."""
        if self.max_job_steps is not None and tcfg.steps - done > self.max_job_steps:
            raise ValueError(f"this job would train {tcfg.steps - done:,} steps, more than the {self.max_job_steps:,} "
                             f"one job may here; lower the steps to at most {done + self.max_job_steps:,}.")
        if self.max_job_tokens is None:
            return
        per_step = tcfg.batch_size * tcfg.grad_accum * dataset.block_size(tcfg.seq_len)[0]
        tokens = (tcfg.steps - done) * per_step
        if tokens > self.max_job_tokens:
            raise ValueError(f"this job would train {tokens:,} tokens ({tcfg.steps - done:,} steps of {per_step:,}), "
                             f"more than the {self.max_job_tokens:,} one job may here; lower the steps to at most "
                             f"{done + self.max_job_tokens // per_step:,}, or the batch, accumulation or sequence "
                             f"length.")

    # ---- control -------------------------------------------------------------------------

    def start(self, base_id: str, dataset: Dataset, name: str, lcfg: LoraConfig, tcfg: TrainConfig,
              owner: str | None = None, user: str | None = None, report_to: str = "none",
              address: str | None = None) -> TrainJob:
        """Queue a new adapter `name` for training into the library; it starts when there is room.
        owner: who may stop it and whose limit it counts against (the signed-in user or the browser);
        user: the signed-in user name recorded in studio.json; report_to: a tracker of
        core.train.trackers.REPORT_TO; address: without sign-in, the client's address (its jobs may be
        users_per_address times the per-user limit). Raises ValueError (the name is taken, a per-user or
        per-address limit, --max-job-tokens, a full queue, a tracker whose package is missing)."""
        check_name(name)
        self.scheduler.check_room(owner)  # a second Start hears of the limit, not of the name its first one took
        self.check_budget(dataset, tcfg)
        out_dir = self.engine.library.root / name
        trackers = make_trackers(report_to, out_dir)
        library = self.engine.library
        with library.lock():  # reserve the name now: the first checkpoint comes later
            if out_dir.exists() or out_dir.is_symlink():
                raise ValueError(f"the library already has an adapter named '{name}'; choose another "
                                 f"name (or resume that run).")
            # held while this process lives: a crash right after Start leaves a folder the next start-up sweeps
            hold = library.reserve_run(name, user)  # refused past the user's quota or the disk's floor
        return self._submit(hold, JobSpec(name, base_id, dataset, lcfg, tcfg, out_dir, user=owner,
                                          meta=_run_meta(name, user), adapter=training_adapter(name),
                                          max_memory=self.engine.max_train_memory, trackers=trackers),
                            address)

    def resume(self, base_id: str, dataset: Dataset, name: str, steps: int | None = None,
               owner: str | None = None, user: str | None = None, report_to: str = "none",
               address: str | None = None) -> TrainJob:
        """Continue stopped run `name` from its newest checkpoint (to `steps` in total, default its plan).
        The run keeps the signed-in user it was started by; `user` is recorded only when it had none."""
        check_name(name)
        trackers = make_trackers(report_to, self.run_dir(name))
        if self.training(name) is not None:
            raise ValueError(f"'{name}' is already queued or training.")
        self.scheduler.check_room(owner)
        ck = find_checkpoint(self.run_dir(name))
        tcfg = ck.tcfg
        if steps is not None and steps != tcfg.steps:
            tcfg = TrainConfig.from_dict({**tcfg.to_dict(), "steps": int(steps)})
        self.check_budget(dataset, tcfg, done=ck.step)
        recorded = ck.meta.get("user") if isinstance(ck.meta.get("user"), str) and ck.meta.get("user") else user
        self.engine.library.check_quota(user, new=False)  # more checkpoints: the size cap and the floor
        meta = _run_meta(name, recorded)
        if self.engine.library.details(name).get("shared") is True:
            meta["shared"] = True  # a run its owner shared stays shared as it trains on
        hold = self.engine.library.hold_run(name)  # refused while another process trains this run
        return self._submit(hold, JobSpec(name, base_id, dataset, None, tcfg, self.run_dir(name), user=owner,
                                          resume=ck, meta=meta, adapter=training_adapter(name),
                                          max_memory=self.engine.max_train_memory, trackers=trackers),
                            address)

    def stop(self, job_id=None, owner: str | None = None, admin: bool = False, by: str | None = None) -> str:
        """Stop a job (default: the owner's newest live one). Only its owner, or an admin, may; owner None
        is the process itself (tests, tools). by: the admin's name, recorded (and shown to the job's owner)
        when an admin stops someone else's job ('' for an unnamed admin: the admin token)."""
        job = self.find(job_id, owner) if job_id not in (None, "") else next(
            (j for j in sorted(self.scheduler.live(), key=lambda j: -j.id) if owner is None or j.user == owner), None)
        if job is None or not job.live and job.state != "paused":  # paused: a ZeroGPU run no page drives
            return "No training job of yours is queued or running." if job is None else \
                f"'{job.name}' is not running."
        if owner is not None and not admin and job.user != owner:
            who = job.spec.meta.get("user") or "someone else"
            raise ValueError(f"'{job.name}' was started by {who}; only they (or an admin) can stop it.")
        return self.scheduler.stop(job, by=by if admin and job.user != owner else None)

    def run_dir(self, name: str) -> Path:
        return self.engine.library.root / check_name(name)

    def wait(self, timeout: float | None = None) -> dict | None:
        """Block until every job has ended (tests, shutdown); the newest job's final snapshot."""
        end = None if timeout is None else time.monotonic() + timeout
        for job in self.scheduler.live():
            job.wait(None if end is None else max(0.0, end - time.monotonic()))
        return self.snapshot()

    def stop_all(self, timeout: float = 60) -> None:
        for job in self.scheduler.live():
            self.scheduler.stop(job)
        self.wait(timeout)

    # ---- internals -----------------------------------------------------------------------

    def _submit(self, hold, spec: JobSpec, address: str | None = None) -> TrainJob:
        spec.on_end = lambda job: hold.release()  # a run that saved nothing frees its name
        try:
            with self._submitting:
                if address is not None:
                    self._check_address(address)
                job = self.scheduler.submit(spec)
                if address is not None:
                    self._addresses[job.id] = address
                return job
        except BaseException:
            hold.release()
            raise

    def _check_address(self, address: str) -> None:
        """Without sign-in a browser id is the client's choice: its address's live jobs count as well."""
        live = {j.id for j in self.scheduler.live()}
        self._addresses = {i: a for i, a in self._addresses.items() if i in live}
        n = sum(a == address for a in self._addresses.values())
        cap = self.scheduler.max_jobs_per_user * self.users_per_address
        if n >= cap:
            raise ValueError(f"your address already has {n} training job{'s' if n != 1 else ''} queued or running, "
                             f"the limit for all pages from one address ({cap}); wait for one to finish, or stop it.")
