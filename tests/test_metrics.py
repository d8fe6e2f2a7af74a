"""Run metrics: every step's numbers land in studio.json's history, and the Library downloads them as
CSV and JSON, a view of that history (the same function serves the tab and this test)."""
from __future__ import annotations

import csv
import json

import pytest

from train_helpers import quick, train_to_end
from core.adapters import run_record
from core.adapters.metrics import COLUMNS, write_metrics
from core.lora.config import LoraConfig
from core.train.trainer import Trainer
from studio.tabs import library


def _meta(run) -> dict:
    """studio.json with the run's history (history.jsonl beside it) as "history"."""
    return {**json.loads((run / "studio.json").read_text()), "history": list(run_record.history(run))}


@pytest.fixture
def trained(studio, sample_ds):
    """A 6-step run saved in the studio's library as 'run' (validation every 3 steps), and its studio.json."""
    run = studio.library.root / "run"
    train_to_end(Trainer(studio.base("tiny"), sample_ds, LoraConfig(r=2), quick(steps=6, eval_interval=3),
                       "run", run))
    return _meta(run)


def test_every_step_records_loss_lr_grad_norm_speed_and_time(trained):
    history = trained["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    for h in history:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec", "elapsed", "wall_time"} <= h.keys()
        assert h["tokens_per_sec"] > 0 and h["grad_norm"] > 0
    assert [h["step"] for h in history if "val_loss" in h] == [3, 6]
    assert all(a["elapsed"] < b["elapsed"] and a["wall_time"] <= b["wall_time"] for a, b in zip(history, history[1:]))


def test_a_resumed_run_counts_its_time_from_where_it_stopped(tiny, sample_ds, tmp_path):
    run = tmp_path / "run"
    train_to_end(Trainer(tiny, sample_ds, LoraConfig(r=2), quick(steps=4), "run", run))
    before = _meta(run)["history"][-1]["elapsed"]
    train_to_end(Trainer(tiny, sample_ds, None, quick(steps=6), "", run, resume=run))
    history = _meta(run)["history"]
    assert [h["step"] for h in history] == list(range(1, 7)) and history[3]["elapsed"] == before
    assert history[4]["elapsed"] > before


def test_the_csv_and_json_downloads_equal_the_history(studio, trained):
    csv_path = library.export_metrics(studio, "run", "csv")
    json_path = library.export_metrics(studio, "run", "json")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == COLUMNS and len(rows) == len(trained["history"])
    for row, h in zip(rows, trained["history"]):
        assert {c: float(v) for c, v in row.items() if v != ""} == h  # the same fields, the same numbers exactly
    down = json.loads(open(json_path).read())
    assert down["history"] == trained["history"] and down["start_val_loss"] == trained["start_val_loss"]
    assert down["columns"] == list(COLUMNS) and down["name"] == "run"


def test_an_older_studio_json_downloads_with_empty_cells_for_what_it_lacks(tmp_path):
    meta = {"name": "old", "history": [{"step": 1, "loss": 3.5, "lr": 1e-4}, {"step": 2, "loss": 3.0, "lr": 2e-4,
                                                                               "val_loss": 3.2}]}
    path = write_metrics(meta, tmp_path, "old", "csv")
    rows = list(csv.DictReader(open(path, newline="")))
    assert rows[0] == {"step": "1", "loss": "3.5", "val_loss": "", "lr": "0.0001", "grad_norm": "",
                       "tokens_per_sec": "", "elapsed": "", "wall_time": ""}
    assert rows[1]["val_loss"] == "3.2"


def test_an_adapter_without_metrics_is_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="has no training metrics"):
        write_metrics({"name": "uploaded"}, tmp_path, "uploaded", "csv")
    with pytest.raises(ValueError, match="choose csv or json"):
        write_metrics({"history": [{"step": 1}]}, tmp_path, "x", "xml")
    assert list(tmp_path.iterdir()) == []
