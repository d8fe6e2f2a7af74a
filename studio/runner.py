"""One background training job per process: start, stop, resume, and what the UI polls.

The runner owns the job; the trainer (core.train.trainer) never imports the UI. A job runs in a daemon
thread of this process, so the page stays responsive and any page (a reload, a second user)
can attach to it by polling `snapshot()`: every event the trainer yields is folded into a small
buffer (loss points, validation points, samples, progress) with a version number that grows
with each event, so a poller redraws only when something changed.

One job at a time: `start` while a job is running raises `RunnerBusy`, whose message names the
job and its progress. `stop` sets the trainer's stop flag; the trainer ends within one optimizer
step and saves the adapter (and a resume checkpoint) to the library.
"""
from __future__ import annotations

import functools
import itertools
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from core.adapters.library import RunHold
from core.adapters.library import check_name
from core.atomic import disk_full
from core.model.config import PRESETS, LoraConfig, TrainConfig
from core.train.data import Dataset
from core.train.estimate import check_memory, estimate_training
from core.lora.layers import adapter_names, remove_adapter
from core.train.trainer import Trainer, find_checkpoint

TRAIN_PREFIX = "train:"  # adapters being trained are loaded under 'train:<run>', never a library name
LIVE = ("starting", "running", "stopping")


class RunnerBusy(RuntimeError):
    """A training job is already running in this process; the message says which and how far."""


def _run_meta(name: str, user: str | None) -> dict:
    """What the studio records in studio.json of a run's adapter and checkpoints beyond the trainer's
    own: the run's library name (not its internal 'train:' name) and the signed-in user."""
    return {"name": name, **({"user": user} if user else {})}


class Job:
    """What one training run has reported so far (thread-safe; read it through `snapshot`)."""

    _ids = itertools.count(1)

    def __init__(self, name: str, base_id: str, dataset: str, user: str | None, steps: int,
                 history: list[dict] | None = None, start_val_loss: float | None = None,
                 resumed_from: int | None = None):
        self.id = next(self._ids)
        self.name, self.base_id, self.dataset, self.user = name, base_id, dataset, user
        self.steps = steps
        self.stop_flag = threading.Event()
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.state = "starting"  # starting, running, stopping, finished, stopped, failed
        self.message = ""  # the error, or where the adapter was saved
        self.notes: list[str] = []
        self.points = [{"step": h["step"], "loss": h["loss"], "lr": h["lr"]}
                       for h in (history or []) if "loss" in h]  # one per optimizer step
        self.evals = ([{"step": 0, "val_loss": start_val_loss}] if start_val_loss is not None else []) + [
            {"step": h["step"], "val_loss": h["val_loss"]} for h in (history or []) if h.get("val_loss") is not None]
        self.samples: list[dict] = []  # {"step", "samples": [{"prompt", "text"}]}, oldest first
        self.progress: dict = {"step": resumed_from or 0, "steps": steps}
        self.resumed_from = resumed_from
        self.trainable_params: int | None = None
        self.path: str | None = None
        self.started = time.time()
        self.ended: float | None = None
        self.version = 0

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def on_event(self, ev: dict) -> None:
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
                self.state = "failed"
                self.message = ev["message"]
                self.ended = time.time()
            elif t == "done":
                self.state = ev["status"] if ev["status"] in ("finished", "stopped") else "finished"
                self.path = ev.get("path")
                self.progress.update(step=ev["step"], steps=ev["steps"], eta=0.0)
                self.message = f"saved to the library as '{self.name}'"
                self.ended = time.time()
            self.version += 1

    def request_stop(self) -> None:
        with self._lock:
            self.stop_flag.set()
            if self.live:
                self.state = "stopping"
                self.version += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "id": self.id, "version": self.version, "name": self.name, "base_id": self.base_id,
                "dataset": self.dataset, "user": self.user, "state": self.state, "live": self.live,
                "message": self.message, "notes": list(self.notes), "points": list(self.points),
                "evals": list(self.evals), "samples": list(self.samples), "progress": dict(self.progress),
                "trainable_params": self.trainable_params, "path": self.path, "started": self.started,
                "ended": self.ended, "resumed_from": self.resumed_from,
            }

    def describe(self) -> str:
        """'<name>' (step 12/200, 6%) by <user>: for busy messages."""
        p = self.progress
        step, steps = p.get("step", 0), p.get("steps", self.steps) or 1
        who = f" by {self.user}" if self.user else ""
        return f"'{self.name}' on {self.base_id}{who} (step {step}/{steps}, {100 * step / steps:.0f}%)"


def _unpin_if_refused(method):
    """Runner.start/resume(model, ..., pinned=True): release the base's pin if the job does not start
    (a launched job releases it when it ends)."""
    @functools.wraps(method)
    def wrapper(self, model, *args, pinned: bool = False, **kw):
        try:
            return method(self, model, *args, pinned=pinned, **kw)
        except BaseException:
            if pinned:
                self.engine.unpin_base(model)
            raise
    return wrapper


class Runner:
    """Owns the process's one training job. `engine` is the shared core.engine.Engine."""

    def __init__(self, engine):
        self.engine = engine
        self._lock = threading.Lock()
        self.job: Job | None = None

    # ---- queries -------------------------------------------------------------------------

    def busy(self) -> Job | None:
        """The running job, if any."""
        job = self.job
        return job if job is not None and job.live else None

    def busy_message(self) -> str | None:
        job = self.busy()
        if job is None:
            return None
        return (f"Busy: training {job.describe()} is running. One training job runs at a time; "
                f"wait for it to finish (the chart on the Train tab follows it). Comparing still works.")

    def snapshot(self) -> dict | None:
        job = self.job
        return job.snapshot() if job is not None else None

    def check_memory(self, base_id: str, dataset: Dataset, lcfg: LoraConfig, tcfg: TrainConfig) -> None:
        """Before loading base `base_id` (a preset) for a run: refuse settings whose estimated peak exceeds
        --max-train-memory or the memory available (MemoryLimitError); the Trainer checks again on the
        loaded base."""
        engine, cfg = self.engine, PRESETS[base_id]
        seq_len, _ = dataset.block_size(tcfg.seq_len)
        loaded = engine.model is not None and engine.base_id == base_id
        est = estimate_training(cfg, lcfg, replace(tcfg, seq_len=seq_len), engine.device.type)
        check_memory(est, engine.device, engine.max_train_memory, loaded=loaded,
                     advice=f"lower the batch size (now {tcfg.batch_size}), the sequence length (now {seq_len}) "
                            f"or the rank (now {lcfg.r}); gradient accumulation keeps the effective batch at "
                            f"no memory cost")

    # ---- control -------------------------------------------------------------------------

    @_unpin_if_refused
    def start(self, model, base_id: str, dataset: Dataset, name: str, lcfg: LoraConfig,
              tcfg: TrainConfig, user: str | None = None, pinned: bool = False) -> Job:
        """Train a new adapter `name` into the library; raises RunnerBusy, ValueError (MemoryLimitError:
        the settings need more memory than there is), AdapterError.

        pinned: `model` came from engine.base(..., pin=True); the runner owns that pin from here on and
        releases it when the job ends, or at once if the job does not start.
        """
        check_name(name)
        out_dir = self.engine.library.root / name
        with self._lock:
            self._check_free()
            job = Job(name, base_id, dataset.name, user, tcfg.steps)
            # settings (and the memory they need) are checked before the name is reserved, so a
            # refused run leaves no empty folder blocking its name
            trainer = Trainer(model, dataset, lcfg, tcfg, TRAIN_PREFIX + name, out_dir, job.stop_flag,
                              base_id=base_id, meta=_run_meta(name, user), max_memory=self.engine.max_train_memory)
            library = self.engine.library
            with library.lock():  # reserve the name now: the first checkpoint comes later
                if out_dir.exists() or out_dir.is_symlink():
                    raise ValueError(f"the library already has an adapter named '{name}'; choose another "
                                     f"name (or resume that run).")
                # held while this process lives: a crash right after Start leaves a folder the next start-up sweeps
                hold = library.reserve_run(name)
            self._launch(job, trainer, hold, pinned)
            return job

    @_unpin_if_refused
    def resume(self, model, base_id: str, dataset: Dataset, name: str, steps: int | None = None,
               user: str | None = None, pinned: bool = False) -> Job:
        """Continue stopped run `name` from its newest checkpoint (to `steps` in total, default its plan).
        The run keeps the owner it was started by; `user` owns it only when it had none. pinned: as for start()."""
        check_name(name)
        ck = find_checkpoint(self.run_dir(name))
        tcfg = ck.tcfg
        if steps is not None and steps != tcfg.steps:
            tcfg = TrainConfig.from_dict({**tcfg.to_dict(), "steps": int(steps)})
        owner = ck.meta.get("user") if isinstance(ck.meta.get("user"), str) and ck.meta.get("user") else user
        with self._lock:
            self._check_free()
            job = Job(name, base_id, dataset.name, owner, tcfg.steps, history=ck.meta.get("history"),
                      start_val_loss=ck.meta.get("start_val_loss"), resumed_from=ck.step)
            trainer = Trainer(model, dataset, None, tcfg, TRAIN_PREFIX + name, self.run_dir(name), job.stop_flag,
                              base_id=base_id, resume=ck, meta=_run_meta(name, owner),
                              max_memory=self.engine.max_train_memory)
            hold = self.engine.library.hold_run(name)  # refused while another process trains this run
            self._launch(job, trainer, hold, pinned)
            return job

    def stop(self, user: str | None = None, auth: bool = False, admins=frozenset()) -> str:
        """Ask the running job to stop; with sign-in on, only the user who started it (or an admin) may."""
        job = self.busy()
        if job is None:
            return "No training job is running."
        if auth and job.user and user != job.user and user not in admins:
            raise ValueError(f"'{job.name}' was started by {job.user}; only they (or an admin) can stop it.")
        job.request_stop()
        return f"Stopping '{job.name}': it ends within one optimizer step and is saved to the library."

    def run_dir(self, name: str) -> Path:
        return self.engine.library.root / check_name(name)

    def monitor(self, interval: float = 0.5) -> Iterator[dict]:
        """Yield the current job's snapshot whenever it changed, until the job ends."""
        seen = None
        while True:
            snap = self.snapshot()
            if snap is None:
                return
            if (snap["id"], snap["version"]) != seen:
                seen = (snap["id"], snap["version"])
                yield snap
            if not snap["live"]:
                return
            time.sleep(interval)

    def wait(self, timeout: float | None = None) -> dict | None:
        """Block until the current job's thread ends (tests, shutdown); its final snapshot."""
        job = self.job
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return self.snapshot()

    # ---- internals -----------------------------------------------------------------------

    def _check_free(self) -> None:
        if self.busy() is not None:
            raise RunnerBusy(self.busy_message())

    def _launch(self, job: Job, trainer: Trainer, hold: RunHold, pinned: bool = False) -> None:
        self.job = job
        job.thread = threading.Thread(target=self._work, args=(job, trainer, hold, pinned),
                                      name=f"train-{job.name}", daemon=True)
        job.thread.start()

    def _work(self, job: Job, trainer: Trainer, hold: RunHold, pinned: bool = False) -> None:
        model, lock = trainer.model, self.engine.lock
        final = None  # 'done' or 'error': reported only after the cleanup below, so the job stays
        try:          # busy until its live adapter is gone (a quick Resume cannot race the cleanup)
            with lock:  # adding the run's adapter changes the shared model's structure: under the engine lock
                trainer.setup()
            for ev in trainer.run():
                if ev["type"] in ("done", "error"):
                    final = ev
                else:
                    job.on_event(ev)
        except Exception as e:  # noqa: BLE001 - reported to every page that follows the job
            final = {"type": "error", "message": f"training failed: {e}" if isinstance(e, ValueError) else
                     f"training failed: {type(e).__name__}: {e}"}
            if disk_full(e):
                final["message"] = (f"training stopped: not enough disk space to save the adapter ({e.strerror}). "
                                    f"Checkpoints saved before are kept; free some space, then Resume.")
        finally:
            with lock:  # the saved adapter is loaded from the library when used; drop the live one
                if trainer.name in adapter_names(model):
                    remove_adapter(model, trainer.name)
            hold.release()  # a new run that saved nothing (failed before its first checkpoint) frees its name
            if pinned:  # before the job stops being live, so a new start never finds the base pinned
                self.engine.unpin_base(model)
            job.on_event(final or {"type": "error", "message": "training ended without a result."})
