"""Experiment trackers: a job's training events logged where people already look (`--report-to`).

A tracker is an event consumer (core.train.jobs.JobSpec.trackers): it gets every event of one job,
the final 'done' or 'error' included, and closes itself on that one. Each tracker's package is
optional and imported only when it is chosen; a missing one is a ValueError that says what to install.

tensorboard: event files in <run>/tensorboard/ (`tensorboard --logdir <library>` shows every run):
    train/loss, train/lr, train/grad_norm, train/tokens_per_sec at each step; eval/loss and eval/ppl at
    each evaluation; samples as text. A resumed run appends a new event file beside the old ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

REPORT_TO = ("none", "tensorboard")  # the choices of --report-to and the Train tab
TENSORBOARD_DIR = "tensorboard"  # in the run folder
STEP_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_sec")  # a 'step' event's fields logged as train/<field>


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


def make_trackers(report_to: str | None, run_dir) -> list[Callable[[dict], None]]:
    """The trackers a job reports to: [] for 'none' (or None). ValueError for an unknown name or a
    tracker whose package is missing."""
    if report_to in (None, "", "none"):
        return []
    if report_to == "tensorboard":
        return [TensorBoardTracker(run_dir)]
    raise ValueError(f"unknown tracker {str(report_to)[:40]!r}; choose one of {', '.join(REPORT_TO)}.")


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("reporting to TensorBoard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter
