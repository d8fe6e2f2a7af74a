"""Experiment trackers: a job's training events logged where people already look (`--report-to`).

A tracker is an event consumer (core.train.jobs.JobSpec.trackers): it gets every event of one job,
the final 'done' or 'error' included, and closes itself on that one. Each tracker's package is
optional and imported only when it is chosen; a missing one is a ValueError that says what to install.

tensorboard: event files in <run>/tensorboard/ (`tensorboard --logdir <library>` shows every run):
    train/loss, train/lr, train/grad_norm, train/tokens_per_sec at each step; eval/loss and eval/ppl at
    each evaluation; samples as text. A resumed run appends a new event file beside the old ones.
wandb: offline only (never a network call): <run>/wandb/offline-run-*/, the same train/* and eval/* metrics
    at the same steps; `wandb sync <run>/wandb/offline-run-*` uploads one later if the user wants. A resumed
    run is a new offline run that starts at the checkpoint's step.
trackio: local only (no Space, no server, no dashboard launched): its SQLite database in TRACKIO_DIR, by
    default <library>/.trackio/ (project "lora-studio", one trackio run per run name; a resumed run
    continues it); `TRACKIO_DIR=<library>/.trackio trackio show` shows them. trackio reads TRACKIO_DIR once,
    when it is first imported, so one process keeps one store.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable

REPORT_TO = ("none", "tensorboard", "wandb", "trackio")  # the choices of --report-to and the Train tab
TENSORBOARD_DIR = "tensorboard"  # in the run folder
STEP_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_sec")  # a 'step' event's fields logged as train/<field>
WANDB_DIR = "wandb"  # in the run folder; wandb itself adds offline-run-<time>-<id>/
TRACKIO_DEFAULT_DIR = ".trackio"  # in the library (a dot name, so it is never taken for a run) unless TRACKIO_DIR is set
PROJECT = "lora-studio"  # the wandb and trackio project every run logs to, under its run name


def _metrics(ev: dict) -> dict[str, float]:
    """The scalars of one event, under the names TensorBoard uses too; {} for an event with none."""
    if ev.get("type") == "step":
        return {f"train/{k}": ev[k] for k in STEP_SCALARS}
    if ev.get("type") == "eval":
        return {"eval/loss": ev["val_loss"], "eval/ppl": ev["val_ppl"]}
    return {}


class TensorBoardTracker:
    """Writes one job's events to TensorBoard event files in `<run_dir>/tensorboard/`. The writer is made at
    the first event, so a job that never starts leaves no folder behind."""

    name = "TensorBoard"  # for messages

    def __init__(self, run_dir):
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR  # where the event files go
        self._writer_class = _summary_writer()  # checked now: a missing package is refused before training
        self._writer = None  # made at the first event

    def __call__(self, ev: dict) -> None:
        kind = ev.get("type")
        if kind in ("done", "error"):
            self.close()
            return
        w = self._writer
        if w is None:  # a resumed run drops what a killed process logged after the checkpoint it resumes
            start = ev.get("step") if kind == "start" else None
            w = self._writer = self._writer_class(log_dir=str(self.log_dir), purge_step=start + 1 if start else None)
        if kind == "step":
            for k in STEP_SCALARS:
                w.add_scalar(f"train/{k}", ev[k], ev["step"])
        elif kind == "eval":
            w.add_scalar("eval/loss", ev["val_loss"], ev["step"])
            w.add_scalar("eval/ppl", ev["val_ppl"], ev["step"])
        elif kind == "sample":
            text = "\n\n".join(f"**{s['prompt']}** {s['text']}" for s in ev["samples"])
            w.add_text("samples", text, ev["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # flushes the event file
            self._writer = None


class _RunTracker:
    """A tracker that logs each event's scalars (_metrics) to one run of a tracking library, made at the
    first event (a job that never starts leaves nothing) and finished at 'done' or 'error'."""

    _run = None

    def __call__(self, ev: dict) -> None:
        if ev.get("type") in ("done", "error"):
            self.close()
            return
        if self._run is None:
            self._run = self._start()
        if metrics := _metrics(ev):
            self._run.log(metrics, step=ev["step"])  # an eval after a step at the same step joins its row

    def close(self) -> None:
        if self._run is not None:
            self._finish(self._run)
            self._run = None

    def _start(self):
        raise NotImplementedError

    def _finish(self, run) -> None:
        run.finish()


class WandbTracker(_RunTracker):
    """Logs one job's metrics to an offline Weights & Biases run in `<run_dir>/wandb/`. The run is made at the
    first event (a job that never starts leaves nothing)."""

    name = "wandb"  # for messages

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)  # wandb writes <run_dir>/wandb/offline-run-*/
        # set before wandb reads them, and again over a user's WANDB_MODE=online: this tracker never uploads
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true",
                          WANDB_DISABLE_CODE="true", WANDB_CONFIG_DIR=str(self.run_dir / WANDB_DIR / "config"))
        self._wandb = _optional("wandb", "wandb", "wandb")

    def _start(self):
        (self.run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        settings = self._wandb.Settings(mode="offline", silent=True, console="off", reinit="create_new",
                                        x_disable_stats=True, disable_git=True, save_code=False,
                                        x_save_requirements=False, x_disable_meta=True, x_disable_machine_info=True)
        return self._wandb.init(mode="offline", dir=str(self.run_dir), project=PROJECT, name=self.run_dir.name,
                                settings=settings)


class TrackioTracker(_RunTracker):
    """Logs one job's metrics to a local trackio run (SQLite, in TRACKIO_DIR or <library>/.trackio/). The run
    is made at the first event."""

    name = "trackio"  # for messages

    def __init__(self, run_dir):
        self.run_name = Path(run_dir).name  # the trackio run
        os.environ.setdefault("TRACKIO_DIR", str(Path(run_dir).parent / TRACKIO_DEFAULT_DIR))  # before the import
        for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):  # they would send the metrics away
            os.environ.pop(var, None)
        self._trackio = _optional("trackio", "trackio", "trackio")
        self.store = Path(self._trackio.utils.TRACKIO_DIR)  # where the database really is (fixed at import)

    def _start(self):
        with contextlib.redirect_stdout(io.StringIO()):  # its banner would interleave with the CLI's lines
            return self._trackio.init(project=PROJECT, name=self.run_name, resume="allow",
                                      auto_log_gpu=False, auto_log_cpu=False, embed=False)

    def _finish(self, run) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            run.finish()  # writes what is queued to the database


def make_trackers(report_to: str | None, run_dir) -> list[Callable[[dict], None]]:
    """The trackers a job reports to: [] for 'none' (or None). ValueError for an unknown name or a
    tracker whose package is missing."""
    if report_to in (None, "", "none"):
        return []
    if report_to == "tensorboard":
        return [TensorBoardTracker(run_dir)]
    if report_to == "wandb":
        return [WandbTracker(run_dir)]
    if report_to == "trackio":
        return [TrackioTracker(run_dir)]
    raise ValueError(f"unknown tracker {str(report_to)[:40]!r}; choose one of {', '.join(REPORT_TO)}.")


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("reporting to TensorBoard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def _optional(module: str, package: str, tracker: str):
    """Imports a tracker's package, or a one-line ValueError that says what to install."""
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"reporting to {tracker} needs the {package} package: pip install {package}") from None
