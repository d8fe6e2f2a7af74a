"""A run's metrics as downloads (CSV and JSON): a view of its history (core.adapters.run_record).

The trainer records one point per optimizer step (core.train.trainer): step, loss (train), lr, grad_norm,
tokens_per_sec, elapsed (training seconds since the run began, resumes included), wall_time (Unix time
the step ended), and val_loss at the steps it evaluated. Files written before metrics export lack the
last four; their cells are empty. The validation loss before training is studio.json's start_val_loss
(in the JSON download; the CSV has one row per step).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from core import atomic
from core.adapters import run_record

COLUMNS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "elapsed", "wall_time")
FORMATS = ("csv", "json")


def history_of(meta: dict, history=None) -> list[dict]:
    """The run's checked history points: `history` (run_record.history of its folder), else the inline list
    of an older studio.json."""
    return list(run_record.history(None, meta if isinstance(meta, dict) else {}) if history is None else history)


def metrics_json(meta: dict, history=None) -> str:
    """{"name", "base_model", "start_val_loss", "columns", "history"}: the history as the record holds it."""
    return json.dumps({"name": meta.get("name"), "base_model": meta.get("base_model"),
                       "start_val_loss": meta.get("start_val_loss"), "columns": list(COLUMNS),
                       "history": history_of(meta, history)}, indent=1)


def metrics_csv(meta: dict, history=None) -> str:
    """A header of COLUMNS, then one row per step (numbers as Python writes them: they read back exactly)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for h in history_of(meta, history):
        w.writerow(["" if h.get(c) is None else repr(h[c]) for c in COLUMNS])
    return buf.getvalue()


def write_metrics(meta: dict, dest_dir, stem: str, fmt: str, history=None) -> Path:
    """<dest_dir>/<stem>-metrics.<fmt>, written atomically. ValueError for a run without metrics.
    history: the run's points (run_record.history); default the inline list of an older studio.json."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown metrics format {fmt!r}; choose {' or '.join(FORMATS)}.")
    history = history_of(meta, history)
    if not history:
        raise ValueError(f"{stem!r} has no training metrics (it was not trained here, or stopped before its "
                         f"first step); train or resume a run to get them.")
    text = metrics_csv(meta, history) if fmt == "csv" else metrics_json(meta, history)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    return atomic.publish_file(dest / f"{stem.replace('@', '-')}-metrics.{fmt}",
                               lambda tmp: tmp.write_text(text, encoding="utf-8"))
