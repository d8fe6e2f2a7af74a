"""A run's metrics as downloads (CSV and JSON): a view of the `history` in its studio.json.

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

COLUMNS = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_sec", "elapsed", "wall_time")
FORMATS = ("csv", "json")


def history_of(meta: dict) -> list[dict]:
    """The run's history points (dicts with an int step) from a studio.json read through clean_meta."""
    history = meta.get("history") if isinstance(meta, dict) else None
    return [h for h in history or [] if isinstance(h, dict) and isinstance(h.get("step"), int)]


def metrics_json(meta: dict) -> str:
    """{"name", "base_model", "start_val_loss", "columns", "history"}: the history as studio.json holds it."""
    return json.dumps({"name": meta.get("name"), "base_model": meta.get("base_model"),
                       "start_val_loss": meta.get("start_val_loss"), "columns": list(COLUMNS),
                       "history": history_of(meta)}, indent=1)


def metrics_csv(meta: dict) -> str:
    """A header of COLUMNS, then one row per step (numbers as Python writes them: they read back exactly)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for h in history_of(meta):
        w.writerow(["" if h.get(c) is None else repr(h[c]) for c in COLUMNS])
    return buf.getvalue()


def write_metrics(meta: dict, dest_dir, stem: str, fmt: str) -> Path:
    """<dest_dir>/<stem>-metrics.<fmt>, written atomically. ValueError for a run without metrics."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown metrics format {fmt!r}; choose {' or '.join(FORMATS)}.")
    if not history_of(meta):
        raise ValueError(f"{stem!r} has no training metrics (it was not trained here, or stopped before its "
                         f"first step); train or resume a run to get them.")
    text = metrics_csv(meta) if fmt == "csv" else metrics_json(meta)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    return atomic.publish_file(dest / f"{stem.replace('@', '-')}-metrics.{fmt}",
                               lambda tmp: tmp.write_text(text, encoding="utf-8"))
