"""The training job scheduler: every user's runs train at once on the loaded base, co-batched.

Jobs wait in a queue and start when the shared step has room (a token budget per step: a flag on
CPU, the memory estimate against free memory on a GPU) and the loaded base is theirs: a job on another
base waits until the current base has no jobs, then the base is switched. Turns are fair:
- the queue is offered in order of the owner's running jobs (a user with fewer running goes first),
  then in queue order (arrival, or where an admin moved it);
- the first offered job that can start does, not only the first in line: a big job that does not
  fit yet no longer blocks a small one behind it;
- but a job may be passed so at most PASS_LIMIT times: after that nothing starts past it, so the
  running jobs drain until it fits (it is never starved);
- a job runs at most max_job_minutes (then it is stopped and saved, and says why).
Running jobs share every micro-step (core.train.loop.TrainLoop). The scheduler's thread manages the
jobs; on an engine each shared micro-step runs on the base's work loop, one unit of side work taking
the training jobs' turns (core.generate.side_work), and the events it produces are told to the jobs
back on the scheduler's thread. Each job keeps its own optimizer, schedule, data order, evaluation cadence, samples and checkpoints. A job
that ends leaves alone; an out-of-memory error sends the newest job back to the head of the queue,
exactly where it was, until a running job ends.

A job's events (core.train.trainer's) are folded into a small report (loss and validation points,
samples, progress) with a version that grows with each event: a page polls `snapshot()` and
redraws only on change, and a reloaded page reattaches to it.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from core.adapters import run_record
from core.atomic import disk_full
from core.device import available_memory
from core.lora.layers import adapter_names, remove_adapter
from core.lora.config import LoraConfig
from core.train.config import TrainConfig
from core.train.loop import TrainLoop
from core.train.data import Dataset
from core.train.estimate import estimate_training
from core.adapters.library import RESUMABLE, checkpoint_dirs
from core.train.trainer import Checkpoint, Trainer, failure_message

# Tokens per shared step on CPU and MPS unless set (--train-capacity): 8 jobs of 4 x 128.
CPU_CAPACITY = 4096
# The share of the GPU memory free at a step boundary that co-batched jobs may plan to use.
GPU_SHARE = 0.85
LIVE = ("queued", "starting", "running", "stopping")
TRAINING = ("starting", "running", "stopping")
# Jobs that may start past a queued job that cannot, before the step is kept free for it.
PASS_LIMIT = 4


TRAINING = "the training jobs"  # whose turns the shared micro-steps take on the work loop (never a user name)
TRAIN_PREFIX = "train:"  # a run's adapter trains under 'train:<run>': never a library name, so no request can name it


def training_adapter(run: str) -> str:
    """The name run `run`'s adapter is loaded under while it trains (the Engine refuses it in requests)."""
    return TRAIN_PREFIX + run


@dataclass
class JobSpec:
    """One training job, as a user asks for it."""
    name: str  # the run's name (its adapter's name while training, and its folder's)
    base_id: str  # the base model it trains on (a preset name)
    dataset: Dataset
    lcfg: LoraConfig | None  # None when resuming: the checkpoint's settings
    tcfg: TrainConfig | None  # None when resuming: the checkpoint's (a resume may ask for more steps)
    out_dir: Path  # the run folder
    user: str | None = None  # who asks (the per-user limit, who may stop it): a user name or a session
    resume: Checkpoint | None = None  # continue this checkpoint
    meta: dict = field(default_factory=dict)  # fields written over the trainer's own in studio.json
    weights: str | None = None  # local weights for base_id (None: the hub or the preset)
    adapter: str | None = None  # the name the adapter is trained under (default: name)
    max_memory: int | None = None  # a cap in bytes on the job's estimated peak (--max-train-memory)
    on_end: Callable[["TrainJob"], None] | None = None  # called once when the job has ended (releases a hold)
    listener: Callable[[dict], None] | None = None  # gets every event of the job, the last one included (the CLI)
    trackers: list = field(default_factory=list)  # event consumers that log the job (core.train.trackers), each
                                                  # getting every event; one that fails is dropped with a note
    trainer: Trainer | None = None  # one built by the caller, on the base load_base returns (the CLI builds it
                                    # first, so bad settings are refused before anything runs)


class TrainJob:
    """One job and what it has reported so far (thread-safe; read it through `snapshot`)."""

    _ids = itertools.count(1)

    def __init__(self, spec: JobSpec):
        self.id = next(self._ids)
        self.spec = spec
        self.stop_flag = spec.trainer.stop if spec.trainer is not None else threading.Event()
        self.trainer: Trainer | None = None
        self.model = None  # the base it trains on, once started
        self._lock = threading.Lock()
        self.state = "queued"  # queued, starting, running, stopping, finished, stopped, failed
        self.message = ""  # the error, or where the adapter was saved
        self.notes: list[str] = []
        ck = spec.resume
        history = list(run_record.history(ck.path, ck.meta)) if ck is not None else []
        start_val = ck.meta.get("start_val_loss") if ck is not None else None
        self.points = [{"step": h["step"], "loss": h["loss"], "lr": h.get("lr")}
                       for h in history if isinstance(h, dict) and "loss" in h]
        self.evals = ([{"step": 0, "val_loss": start_val}] if isinstance(start_val, float) else []) + [
            {"step": h["step"], "val_loss": h["val_loss"]} for h in history
            if isinstance(h, dict) and isinstance(h.get("val_loss"), float)]
        self.samples: list[dict] = []  # {"step", "samples": [{"prompt", "text"}]}, oldest first
        steps = spec.tcfg.steps if spec.tcfg is not None else ck.tcfg.steps
        self.resumed_from = ck.step if ck is not None else None
        self.progress: dict = {"step": self.resumed_from or 0, "steps": steps}
        self.trainable_params: int | None = None
        self.path: str | None = None
        self.submitted = time.time()
        self.started: float | None = None
        self.ended: float | None = None
        self.position = 0  # 1 = first in the queue; 0 once it started (set by the scheduler)
        self.waiting = ""  # why a queued job waits (set by the scheduler)
        self.passed = 0  # jobs that started past it while it could not (set by the scheduler; see PASS_LIMIT)
        self.stop_reason = ""  # why it was stopped, when not by its owner: the teacher, the server's time limit
        self.stopped_by: str | None = None  # the admin who stopped it, if one did
        self.rows = 0  # rows (sequences) it adds to each shared step (set by the scheduler)
        self.seq_len = 0  # their length (a shared step pads every row to the longest)
        self.version = 0
        self._final: dict | None = None
        self._done = threading.Event()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def user(self) -> str | None:
        return self.spec.user

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def on_event(self, ev: dict) -> None:
        """Fold one trainer event into the report."""
        with self._lock:
            t = ev.get("type")
            if t == "start":
                self.state = "stopping" if self.stop_flag.is_set() else "running"
                self.trainable_params = ev.get("trainable_params")
                self.progress.update(step=ev["step"], steps=ev["steps"], tokens_per_step=ev["tokens_per_step"])
            elif t == "info":
                self.notes.append(ev["message"])
            elif t == "step":
                self.points.append({"step": ev["step"], "loss": ev["loss"], "lr": ev["lr"]})
                self.progress.update({k: ev[k] for k in ("step", "steps", "eta", "tokens_per_sec", "elapsed",
                                                        "tokens", "step_time") if k in ev})
            elif t == "eval":
                self.evals = [e for e in self.evals if e["step"] != ev["step"]]
                self.evals.append({"step": ev["step"], "val_loss": ev["val_loss"]})
            elif t == "sample":
                self.samples.append({"step": ev["step"], "samples": list(ev["samples"])})
                del self.samples[:-20]
            elif t == "error":
                self.state = "failed" if ev.get("kind") != "cancelled" else "stopped"
                self.message = ev["message"]
                self.ended = time.time()
            elif t == "done":
                self.state = ev["status"] if ev["status"] in ("finished", "stopped") else "finished"
                self.path = ev.get("path")
                self.progress.update(step=ev["step"], steps=ev["steps"], eta=0.0)
                saved = f"saved to the library as '{self.name}'"
                self.message = f"{self.stop_reason}; {saved}" if self.stop_reason and self.state == "stopped" else saved
                self.ended = time.time()
            self.version += 1
        self._track(ev)  # first: whoever sees the last event finds the trackers' files complete
        if self.spec.listener is not None:
            self.spec.listener(ev)

    def _track(self, ev: dict) -> None:
        """Hand the event to the job's trackers. Logging never stops training: a tracker that fails (a full
        disk, a broken package) is dropped, and the job says so."""
        for tracker in list(self.spec.trackers):
            try:
                tracker(ev)
            except Exception as e:  # noqa: BLE001 - reported as a note, the run goes on
                self.spec.trackers.remove(tracker)
                what = getattr(tracker, "name", getattr(tracker, "__name__", "a tracker"))
                with self._lock:
                    self.notes.append(f"logging to {what} stopped ({type(e).__name__}: {e}); training goes on.")
                    self.version += 1

    def _touch(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self, k, v)
            self.version += 1

    def request_stop(self, reason: str = "", by: str | None = None) -> None:
        """Ask the job to end; reason: why, when not its owner's choice (shown in its final message)."""
        with self._lock:
            if reason and not self.stop_flag.is_set():
                self.stop_reason, self.stopped_by = reason, by
            self.stop_flag.set()
            if self.state in TRAINING:
                self.state = "stopping"
                self.version += 1

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has ended and been cleaned up; False on timeout."""
        return self._done.wait(timeout)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "id": self.id, "version": self.version, "name": self.name, "base_id": self.spec.base_id,
                "dataset": self.spec.dataset.name, "owner": self.user, "user": self.spec.meta.get("user"),
                "state": self.state, "live": self.live,
                "message": self.message, "notes": list(self.notes), "points": list(self.points),
                "evals": list(self.evals), "samples": list(self.samples), "progress": dict(self.progress),
                "trainable_params": self.trainable_params, "path": self.path, "submitted": self.submitted,
                "started": self.started, "ended": self.ended, "resumed_from": self.resumed_from,
                "position": self.position, "waiting": self.waiting, "stopped_by": self.stopped_by,
                "stop_reason": self.stop_reason,
            }


def _remove_if_loaded(model, name: str) -> None:
    if name in adapter_names(model):
        remove_adapter(model, name)


class TrainScheduler:
    """One training thread for every job submitted to it, co-batched on the loaded base.

    load_base(spec) -> model: the base a job trains on, loaded (and pinned) for it; called when the
        job starts, only while no job of another base is running. release_base(model): once per job
        that loaded it, when the job ends.
    work(model, fn): runs fn (a shared micro-step, a job's opening) where work on `model` runs (the engine's
        `on_loop`: the base's work loop, taking the training jobs' turns); default: here, on the scheduler's
        thread. change(model, fn): the same for adding a job's adapter (the engine's `change`).
    retire(model, name): removes a job's adapter when the job ends (the engine's `retire`: once no request
        uses it); default: removed at once.
    capacity_tokens: tokens one shared micro-step may hold (the sum of the running jobs' batch x
        sequence length); None: CPU_CAPACITY on CPU and MPS, free memory against the estimate on CUDA.
        A job bigger than the capacity still runs, alone.
    max_jobs_per_user: jobs one user may have queued or running; max_queue: jobs waiting at most.
    max_job_minutes: a job's training time at most (None: no limit); one that reaches it is stopped and saved.
    The order jobs start in is the module's rule (fair turns, PASS_LIMIT).
    """

    @classmethod
    def for_engine(cls, engine, load_base: Callable[[JobSpec], object] | None = None, **kw) -> "TrainScheduler":
        """A scheduler on a core.engine.Engine's one shared base: its pins, its work loop, its device.
        load_base: instead of engine.base(spec.base_id, spec.weights, pin=True) (it must pin too)."""
        load = load_base or (lambda spec: engine.base(spec.base_id, spec.weights, pin=True))
        return cls(load, engine.unpin_base, device_type=engine.device.type, retire=engine.retire,
                   work=lambda model, fn: engine.on_loop(model, fn, TRAINING), change=engine.change, **kw)

    def __init__(self, load_base: Callable[[JobSpec], object], release_base: Callable[[object], None] | None = None,
                 device_type: str = "cpu", capacity_tokens: int | None = None, max_jobs_per_user: int = 1,
                 max_queue: int = 64, retire: Callable[[object, str], None] | None = None,
                 max_job_minutes: float | None = None, work: Callable | None = None, change: Callable | None = None):
        if max_jobs_per_user < 1 or max_queue < 0 or (capacity_tokens is not None and capacity_tokens < 1):
            raise ValueError("max jobs per user and the capacity must be at least 1, the queue at least 0.")
        if max_job_minutes is not None and not max_job_minutes > 0:
            raise ValueError("the minutes one job may train must be more than 0.")
        self.max_job_minutes = max_job_minutes
        self._load_base, self._release_base = load_base, release_base or (lambda model: None)
        self._work = work or (lambda model, fn: fn())
        self._change = change or (lambda model, fn: fn())
        self._outbox: list[tuple[TrainJob, dict]] = []  # events the work loop produced, told on this thread
        self._retire = retire or _remove_if_loaded
        self.device_type = device_type
        self.capacity_tokens = capacity_tokens if capacity_tokens is not None else (
            None if device_type == "cuda" else CPU_CAPACITY)
        self.max_jobs_per_user, self.max_queue = max_jobs_per_user, max_queue
        self._cond = threading.Condition()
        self._queue: deque[TrainJob] = deque()
        self._running: list[TrainJob] = []
        self._recent: deque[TrainJob] = deque(maxlen=50)  # ended jobs, newest last
        self._co: TrainLoop | None = None
        self._squeezed = False  # a shared step ran out of memory: nothing more joins until a job ends
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="train-scheduler", daemon=True)
        self._thread.start()

    # ---- the caller's side --------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> TrainJob:
        """Queue a job; raises ValueError past the per-user limit or a full queue."""
        job = TrainJob(spec)
        tcfg = spec.tcfg if spec.tcfg is not None else spec.resume.tcfg
        job.rows, job.seq_len = tcfg.batch_size, spec.dataset.block_size(tcfg.seq_len)[0]
        with self._cond:
            if self._closed:
                raise RuntimeError("the training scheduler is closed")
            self.check_room(spec.user)
            if len(self._queue) >= self.max_queue:
                raise ValueError(f"busy, try again later: {len(self._queue)} training jobs are waiting.")
            if any(j.name == spec.name and j.spec.out_dir == spec.out_dir for j in self._live()):
                raise ValueError(f"a job named '{spec.name}' is already queued or training.")
            self._queue.append(job)
            self._update_positions()
            self._cond.notify_all()
        return job

    def check_room(self, user) -> None:
        """ValueError when `user` (None: the process itself, never limited) already has max_jobs_per_user jobs."""
        with self._cond:
            mine = [j for j in self._live() if user is not None and j.user == user]
        if len(mine) >= self.max_jobs_per_user:
            raise ValueError(f"you already have {len(mine)} training job{'s' if len(mine) != 1 else ''} "
                             f"queued or running ({', '.join(repr(j.name) for j in mine)}); the limit is "
                             f"{self.max_jobs_per_user} per user. Wait for it to finish, or stop it.")

    def stop(self, job: TrainJob, by: str | None = None) -> str:
        """Stop a job: a queued one leaves the queue (nothing was trained); a running one ends within one
        optimizer step and is saved. by: the admin (teacher) who stops someone else's job, named in its
        message ('' for an unnamed one: the admin token). (Who may stop which job is the caller's rule.)"""
        reason = "" if by is None else f"stopped by the teacher{f' ({by})' if by else ''}"
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._update_positions()
                if reason:
                    job._touch(stopped_by=by, stop_reason=reason)
                self._end(job, {"type": "error", "kind": "cancelled", "step": job.progress.get("step", 0),
                                "checkpoint": None, "message": (f"{reason}: " if reason else "") +
                                "removed from the queue before it started; nothing was trained."})
                return f"'{job.name}' left the queue; nothing was trained."
        if not job.live:
            return f"'{job.name}' is not running."
        job.request_stop(reason, by)
        with self._cond:
            self._cond.notify_all()
        return f"Stopping '{job.name}': it ends within one optimizer step and is saved to the library."

    def jobs(self) -> list[TrainJob]:
        """Running jobs, then queued ones in order, then recently ended ones (newest first)."""
        with self._cond:
            return list(self._running) + list(self._queue) + list(reversed(self._recent))

    def live(self) -> list[TrainJob]:
        with self._cond:
            return self._live()

    def queued(self) -> list[TrainJob]:
        """The queued jobs in the order they are offered a start (the module's rule)."""
        with self._cond:
            return self._offer_order()

    def move(self, job: TrainJob, delta: int) -> str:
        """Move a queued job `delta` places in the queue (negative: nearer the front). An admin's tool: the
        fair share still goes first (a user with fewer running jobs), this orders jobs within it."""
        with self._cond:
            if job not in self._queue:
                raise ValueError(f"'{job.name}' is not waiting in the queue; only queued jobs can move.")
            queue = list(self._queue)
            i = queue.index(job)
            j = min(max(i + int(delta), 0), len(queue) - 1)
            queue.insert(j, queue.pop(i))
            self._queue = deque(queue)
            self._update_positions()
            self._cond.notify_all()
        return f"'{job.name}' is now number {job.position} in the queue."

    def eta_to_start(self, job: TrainJob) -> float | None:
        """Seconds until a queued job can start, as far as the running jobs' ETAs tell (each job that
        ends frees a place); None when unknown."""
        with self._cond:
            if job not in self._queue:
                return None
            pos = self._offer_order().index(job)
            etas = sorted(j.progress.get("eta") for j in self._running if j.progress.get("eta") is not None)
        return etas[pos] if pos < len(etas) else None

    def running_base(self) -> str | None:
        """The base the running jobs train on (None when none runs)."""
        with self._cond:
            return self._running[0].spec.base_id if self._running else None

    def close(self, timeout: float = 30.0) -> None:
        """Stop every job (running ones are saved) and the thread."""
        with self._cond:
            for job in list(self._queue):
                self.stop(job)
            for job in self._running:
                job.request_stop()
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the loop's side ------------------------------------------------------------------------

    def _live(self) -> list[TrainJob]:
        return list(self._running) + list(self._queue)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._running or self._startable())
                if self._closed and not self._running:
                    return
                starting = self._startable() if not self._closed else None
            if starting is not None:
                self._start(starting)
                continue
            self._enforce_time()
            self._step()

    def _enforce_time(self) -> None:
        """Stop (and save) every job that has trained max_job_minutes."""
        if self.max_job_minutes is None:
            return
        now = time.time()
        for job in list(self._running):
            if job.started is not None and now - job.started >= 60 * self.max_job_minutes and not job.stop_flag.is_set():
                job.request_stop(f"stopped: it reached the server's limit of {self.max_job_minutes:g} minutes per job")

    def waits(self, job: TrainJob) -> str | None:
        """Why a queued job cannot start now (None: it starts as soon as the loop sees it)."""
        with self._cond:
            if job not in self._queue:
                return None
            order = self._offer_order()
            ahead = order[:order.index(job)]
            running = list(self._running)
            for other in ahead:  # those ahead that can start, will; one passed too often holds the rest
                if self._reason(other, running) is None:
                    running.append(other)
                elif other.passed >= PASS_LIMIT:
                    return f"waiting its turn: '{other.name}' ahead of it is next, and the step is kept free for it"
            return self._reason(job, running)

    def _reason(self, job: TrainJob, running: list[TrainJob] | None = None) -> str | None:
        """(Holding _cond.) Why `job` could not start beside `running` (default: the running jobs), or None."""
        running = self._running if running is None else running
        if running:
            base = (running[0].spec.base_id, running[0].spec.weights)
            if (job.spec.base_id, job.spec.weights) != base:
                return (f"waiting for the base model: the running jobs train on {base[0]}, this one needs "
                        f"{job.spec.base_id}; it starts when they end.")
            if not self._fits(job, running):
                return ("waiting for room: the running jobs fill this machine's shared training step; it starts "
                        "when one ends.")
        return None

    def _offer_order(self) -> list[TrainJob]:
        """(Holding _cond.) The queue as it is offered a start: owners with fewer running jobs first, then
        queue order (a stable sort)."""
        running: dict = {}
        for j in self._running:
            running[j.user] = running.get(j.user, 0) + 1
        return sorted(self._queue, key=lambda j: running.get(j.user, 0))

    def _startable(self) -> TrainJob | None:
        """(Holding _cond.) The first offered job that can start now, unless one before it was passed
        PASS_LIMIT times; None when none can (each waiting job gets its reason)."""
        for job in self._offer_order():
            reason = self._reason(job)
            if reason is None:
                return job
            self._wait_reason(job, reason)
            if job.passed >= PASS_LIMIT:
                return None
        return None

    def _wait_reason(self, job: TrainJob, reason: str) -> None:
        if job.waiting != reason:
            job._touch(waiting=reason)

    def _fits(self, job: TrainJob, running: list[TrainJob]) -> bool:
        """Whether the shared step has room for `job` beside `running`. A step is every row padded to the
        longest sequence, so that is what is counted: rows x the longest length."""
        if self._squeezed:
            return False
        jobs = running + [job]
        longest = max(j.seq_len for j in jobs)
        if self.capacity_tokens is not None:
            return sum(j.rows for j in jobs) * longest <= self.capacity_tokens
        model = next((j.model for j in running if j.model is not None), None)
        if model is None:  # none loaded yet (a forecast for queued jobs): the loop decides when they start
            return True
        # a GPU: every job's activations against the memory free now
        now = max(j.seq_len for j in running)
        held = sum(self._extra_bytes(j, model, now) for j in self._running)
        room = available_memory(model.device)
        return room is None or sum(self._extra_bytes(j, model, longest) for j in jobs) <= GPU_SHARE * (room + held)

    @staticmethod
    def _extra_bytes(job: TrainJob, model, seq_len: int) -> int:
        """A job's estimated peak beyond the shared base at `seq_len` (padded): activations, logits, its LoRA."""
        spec = job.spec
        lcfg = spec.lcfg if spec.lcfg is not None else spec.resume.lcfg
        tcfg = spec.tcfg if spec.tcfg is not None else spec.resume.tcfg
        est = estimate_training(model.config, lcfg, replace(tcfg, seq_len=seq_len), model.device.type)
        return est.activation_bytes + est.lora_bytes  # the runtime overhead is shared, like the base

    def _update_positions(self) -> None:
        for i, job in enumerate(self._offer_order()):
            if job.position != i + 1:
                job._touch(position=i + 1)

    def _start(self, job: TrainJob) -> None:
        """Load its base, build its trainer and add it to the shared step (it opens, with its first
        validation, in chunks between the others' micro-steps); a job that cannot start ends with its message."""
        spec = job.spec
        with self._cond:
            for other in itertools.takewhile(lambda o: o is not job, self._offer_order()):
                other.passed += 1  # it could not start, and this one goes past it
            self._queue.remove(job)
            job._touch(position=0, waiting="", state="starting", started=job.started or time.time())
            self._running.append(job)
            self._update_positions()
        try:
            if job.trainer is None:  # a job pushed out by an out-of-memory error keeps its trainer
                job.model = self._load_base(spec)
                job.trainer = spec.trainer or Trainer(
                    job.model, spec.dataset, spec.lcfg, spec.tcfg, spec.adapter or spec.name, spec.out_dir,
                    job.stop_flag, base_id=spec.base_id, resume=spec.resume, max_memory=spec.max_memory, meta=spec.meta)
                self._change(job.model, job.trainer.setup)  # its adapter joins the shared model
                if self._co is None or self._co.model is not job.model:
                    self._co = TrainLoop(job.model)
                self._co.join(job.trainer, lambda ev, job=job: self._event(job, ev))  # it opens in the next steps
            else:
                self._co.rejoin(job.trainer, lambda ev, job=job: self._event(job, ev))
                job._touch(state="stopping" if job.stop_flag.is_set() else "running")
        except Exception as e:  # noqa: BLE001 - the job's own failure, reported to whoever follows it
            self._fail(job, e)
        self._collect()

    def _step(self) -> None:
        try:
            pushed = self._work(self._co.model, self._co.step)
        except Exception as e:  # noqa: BLE001 - not one job's fault: every job in the step gets it
            self._tell()
            for job in [j for j in self._running if j.trainer is not None and j.trainer.outcome is not None]:
                self._fail(job, e)
            self._collect()
            return
        self._tell()
        for trainer in pushed:
            job = next(j for j in self._running if j.trainer is trainer)
            with self._cond:
                self._running.remove(job)
                self._squeezed = True
                self._queue.appendleft(job)
                self._update_positions()
            job._touch(state="queued", waiting="back in the queue: the shared step ran out of memory with this "
                                                "job in it; it continues where it was when a running job ends.")
            job.on_event({"type": "info", "message": "out of memory in the shared step: this job went back to "
                                                     "the queue and continues where it was when another job ends."})
        self._collect()

    def _event(self, job: TrainJob, ev: dict) -> None:
        """(On the work loop.) Kept for `_tell`: listeners and trackers never run on the loop's thread."""
        self._outbox.append((job, ev))

    def _tell(self) -> None:
        """Pass the events of the last piece of work to their jobs; a final one waits for the job's cleanup."""
        events, self._outbox = self._outbox, []
        for job, ev in events:
            if ev["type"] in ("done", "error"):  # reported after the cleanup: the job stays live until then
                job._final = ev
            else:
                job.on_event(ev)

    def _fail(self, job: TrainJob, e: BaseException) -> None:
        if job.trainer is not None and job.trainer.outcome is None:
            job.trainer.abort()
        found = checkpoint_dirs(job.spec.out_dir, RESUMABLE)  # what is on disk, not what was hoped for
        kept = str(found[-1]) if found else None
        step = job.trainer.step if job.trainer is not None else job.progress.get("step", 0)
        why = f"{Path(e.filename).name}: {e.strerror}" if isinstance(e, OSError) and e.filename else e  # no server path
        msg = f"training failed: {why}" if isinstance(e, ValueError) else f"training failed: {type(e).__name__}: {why}"
        if kept or disk_full(e):
            msg = failure_message(e, step, kept)
        job._final = {"type": "error", "kind": "internal", "step": step, "message": msg, "checkpoint": kept}
        if job not in self._running:
            with self._cond:
                self._running.append(job)

    def _collect(self) -> None:
        """Clean up the jobs that ended: their live adapter goes, their base is released, then their
        last event is reported."""
        ended = [j for j in self._running if j._final is not None or (j.trainer is not None and j.trainer.outcome)]
        for job in ended:
            if job.trainer is not None and self._co is not None:
                self._co.leave(job.trainer)
            model, name = job.model, job.spec.adapter or job.spec.name
            if model is not None:
                if job.trainer is not None:
                    self._retire(model, name)
                self._release_base(model)
            with self._cond:
                self._running.remove(job)
                self._squeezed = False
                self._update_positions()
            self._end(job, job._final or {"type": "error", "kind": "internal", "step": job.progress.get("step", 0),
                                          "message": "training ended without a result.", "checkpoint": None})

    def _end(self, job: TrainJob, final: dict) -> None:
        job._touch(position=0, waiting="")  # an ended job (a queued one stopped, too) has no place in the queue
        job.on_event(final)
        if job.spec.on_end is not None:
            job.spec.on_end(job)
        with self._cond:
            self._recent.append(job)
            self._cond.notify_all()
        job._done.set()
