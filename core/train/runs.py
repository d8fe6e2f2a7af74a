"""Training runs on an Engine: the one owner of the rules a job obeys before and while it trains.

The scheduler (core.train.jobs) runs the jobs: one shared step for all jobs on the loaded base, a
queue, jobs on another base waiting. `Runs` adds the rules: run names reserved (and runs held) in
the library, the memory check and the job budgets before anything loads, the resume rules (the newest
checkpoint, steps may only grow, the recorded user and a shared run kept), who may stop a job (its
owner or an admin), the per-user and per-address limits, and the per-user view a page polls
(`snapshot`). The studio's Train tab and the CLI's `finetune` (a solo job on a fresh engine) both
go through it; only a torchrun rank, which is no job of this scheduler, shares the pieces it needs
(`resumed_config`, `run_meta`, `hold_run_folder`).
"""
from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from core.adapters.library import RunHold, check_name
from core.device import default_dtype, precision_name
from core.lora.config import LoraConfig
from core.model.config import PRESETS
from core.train.config import TrainConfig
from core.train.data import Dataset
from core.train.estimate import check_memory, estimate_training
from core.train.jobs import JobSpec, TrainJob, TrainScheduler, training_adapter
from core.train.trackers import make_trackers
from core.train.trainer import Checkpoint, Trainer, find_checkpoint


def resumed_config(ck: Checkpoint, steps: int | None = None, **runtime) -> TrainConfig:
    """The settings a resumed run trains on: its checkpoint's, to `steps` in total when given (the trainer
    refuses no more than the checkpoint's step: steps may only grow). runtime: settings that change how a
    step runs, not what it computes (cuda_graphs)."""
    tcfg = ck.tcfg
    changes = {**({"steps": int(steps)} if steps is not None and steps != tcfg.steps else {}), **runtime}
    return TrainConfig.from_dict({**tcfg.to_dict(), **changes}) if changes else tcfg


def in_library(engine, out_dir: Path) -> bool:
    """Whether run folder `out_dir` is a run of `engine`'s library (without opening the library: a CLI run
    saved elsewhere creates no library folder). The folder itself is not followed: a link is a library entry."""
    out_dir = Path(out_dir).expanduser()
    return out_dir.parent.resolve() == Path(engine.library_dir).expanduser().resolve()


def hold_run_folder(engine, out_dir: Path, new: bool, user: str | None = None) -> RunHold:
    """Hold run folder `out_dir` while this process trains it. In the library a new run's name is reserved
    (its empty folder made: refused if taken, past `user`'s quota or the disk's floor), an existing run is
    held (refused while another process trains it); held while this process lives, so a crash leaves a
    folder the next start-up sweeps. Outside the library (the CLI's --output PATH) nobody sweeps: nothing
    is held."""
    if not in_library(engine, out_dir):
        return RunHold(Path(out_dir), None)
    library, name = engine.library, Path(out_dir).name
    if not new:
        return library.hold_run(name)
    with library.lock():
        if (library.root / name).exists() or (library.root / name).is_symlink():
            raise ValueError(f"the library already has an adapter named '{name}'; choose another "
                             f"name (or resume that run).")
        return library.reserve_run(name, user)


def run_meta(engine, name: str, user: str | None = None, resume: Checkpoint | None = None) -> dict:
    """What a run records in studio.json of its adapter and checkpoints beyond the trainer's own: the run's
    library name (not its internal 'train:' name) and the signed-in user. Resumed from checkpoint `resume`:
    the user it was started by (`user` only when it had none), and `shared` kept for a library run its
    owner shared, as it trains on."""
    recorded = resume.meta.get("user") if resume is not None else None
    user = recorded if isinstance(recorded, str) and recorded else user
    meta = {"name": name, **({"user": user} if user else {})}
    if resume is not None and in_library(engine, resume.path.parent.parent) and \
            engine.library.details(name).get("shared") is True:
        meta["shared"] = True
    return meta


class Runs:
    """Every training job of this process, on `engine`'s one shared base.

    load_base(base_id): the base a starting job trains on, loaded and pinned (the scheduler releases the
        pin when the job ends); default engine.base(base_id, the job's weights, pin=True).
    solo: build each job's trainer when it is submitted, on the engine's base (loaded then), so that
        settings the base refuses are refused before the run folder is made: the CLI's one job on a fresh
        engine. A studio's jobs wait for room and build theirs when they start.
    The limits: max_jobs_per_user (queued or running), users_per_address (without sign-in, an address's
    jobs: this x the per-user limit), max_job_tokens and max_job_steps (None: no limit), and the
    scheduler's capacity_tokens and max_job_minutes; scheduler: its class (ZeroGPU's runs chunks).
    """

    def __init__(self, engine, load_base: Callable[[str], object] | None = None, max_jobs_per_user: int = 1,
                 capacity_tokens: int | None = None, max_job_tokens: int | None = None,
                 users_per_address: int = 1, max_job_steps: int | None = None,
                 max_job_minutes: float | None = None, scheduler: type[TrainScheduler] = TrainScheduler,
                 solo: bool = False):
        self.engine = engine
        self.max_job_tokens = max_job_tokens  # a job's steps x tokens per step at most (None: no limit)
        self.max_job_steps = max_job_steps  # a job's optimizer steps at most (None: no limit)
        self.users_per_address = users_per_address  # without sign-in, an address's jobs: this x the per-user limit
        self.solo = solo
        self._submitting = threading.Lock()  # the per-address check and the submit it allows, as one
        self._addresses: dict[int, str] = {}  # live job id -> the client address that asked (without sign-in)
        load = None if load_base is None else (lambda spec: load_base(spec.base_id))
        self.scheduler = scheduler.for_engine(engine, load, capacity_tokens=capacity_tokens,
                                              max_jobs_per_user=max_jobs_per_user, max_job_minutes=max_job_minutes)

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
              address: str | None = None, *, out_dir: Path | None = None, weights: str | None = None,
              listener: Callable[[dict], None] | None = None) -> TrainJob:
        """Queue a new adapter `name` for training into the library; it starts when there is room.
        owner: who may stop it and whose limit it counts against (the signed-in user or the browser);
        user: the signed-in user name recorded in studio.json; report_to: a tracker of
        core.train.trackers.REPORT_TO; address: without sign-in, the client's address (its jobs may be
        users_per_address times the per-user limit). out_dir: the run folder, when not <library>/name (the
        CLI's --output PATH); weights: local weights of base_id; listener: gets every event of the job.
        Raises ValueError (the name is taken, a per-user or per-address limit, --max-job-tokens, a full
        queue, a tracker whose package is missing)."""
        check_name(name)
        self.scheduler.check_room(owner)  # a second Start hears of the limit, not of the name its first one took
        self.check_budget(dataset, tcfg)
        out_dir = self.run_dir(name) if out_dir is None else Path(out_dir)
        spec = JobSpec(name, base_id, dataset, lcfg, tcfg, out_dir, user=owner, meta=run_meta(self.engine, name, user),
                       weights=weights, adapter=training_adapter(name), max_memory=self.engine.max_train_memory,
                       trackers=make_trackers(report_to, out_dir), listener=listener)
        self._build(spec)
        # reserved now (the first checkpoint comes later), held while this process lives
        return self._submit(hold_run_folder(self.engine, out_dir, new=True, user=user), spec, address)

    def resume(self, base_id: str, dataset: Dataset, name: str, steps: int | None = None,
               owner: str | None = None, user: str | None = None, report_to: str = "none",
               address: str | None = None, *, checkpoint: Checkpoint | None = None, weights: str | None = None,
               listener: Callable[[dict], None] | None = None, **runtime) -> TrainJob:
        """Continue stopped run `name` from its newest checkpoint (to `steps` in total, default its plan).
        The run keeps the signed-in user it was started by; `user` is recorded only when it had none.
        checkpoint: continue this one instead (the CLI's --resume PATH or NAME@step, which may be outside
        the library); runtime: see resumed_config; the others as for start."""
        check_name(name)
        out_dir = self.run_dir(name) if checkpoint is None else checkpoint.path.parent.parent
        trackers = make_trackers(report_to, out_dir)
        if self.training(name) is not None:
            raise ValueError(f"'{name}' is already queued or training.")
        self.scheduler.check_room(owner)
        ck = checkpoint or find_checkpoint(out_dir)
        tcfg = resumed_config(ck, steps, **runtime)
        self.check_budget(dataset, tcfg, done=ck.step)
        if in_library(self.engine, out_dir):
            self.engine.library.check_quota(user, new=False)  # more checkpoints: the size cap and the floor
        spec = JobSpec(name, base_id, dataset, None, tcfg, out_dir, user=owner, resume=ck,
                       meta=run_meta(self.engine, name, user, ck), weights=weights,
                       adapter=training_adapter(name), max_memory=self.engine.max_train_memory, trackers=trackers,
                       listener=listener)
        self._build(spec)
        return self._submit(hold_run_folder(self.engine, out_dir, new=False), spec, address)

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

    def close(self, timeout: float = 30.0) -> None:
        """End the scheduler's thread (the jobs are stopped first: see stop_all)."""
        self.scheduler.close(timeout)

    # ---- internals -----------------------------------------------------------------------

    def _build(self, spec: JobSpec) -> None:
        """solo: the job's trainer now, on the engine's base (its checks refuse bad settings before any hold)."""
        if self.solo:
            model = self.engine.base(spec.base_id, spec.weights)
            spec.trainer = Trainer(model, spec.dataset, spec.lcfg, spec.tcfg, spec.adapter, spec.out_dir,
                                   base_id=spec.base_id, resume=spec.resume, max_memory=spec.max_memory,
                                   meta=spec.meta)

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
