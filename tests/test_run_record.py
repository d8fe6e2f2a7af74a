"""A run's record: studio.json stays small whatever the run's length (its owner never depends on it), the
loss history lives in history.jsonl beside it, appended at each checkpoint and read line by line; a
checkpoint reads only its own steps of it; older records with the history inline still read."""
from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
from gradio_client import Client

from adapter_helpers import LX
from core.adapters import run_record
from core.adapters.format import save_adapter
from core.adapters.library import TRAINER_STATE, Library, checkpoint_dirs, checkpoint_path, checkpoint_step
from core.adapters.run_record import CHART_POINTS, HISTORY, META
from core.lora.config import LoraConfig
from core.train.trainer import Trainer
from studio.plots import loss_figure
from studio_server import served_studio
from train_helpers import quick, train_to_end

USERS = [("ann", "s3cret-ann"), ("bob", "s3cret-bob")]
EVERY_2 = dict(checkpoint_interval=2, keep_checkpoints=0)  # a checkpoint every 2 steps, all kept


def _point(step: int) -> dict:
    """A history point as the trainer writes it (~250 bytes as JSON)."""
    return {"step": step, "loss": 3.0 + 1 / step, "lr": 1.2345678e-4, "grad_norm": 0.123456789012,
            "tokens_per_sec": 12345.678901234, "elapsed": step * 0.123456789, "wall_time": 1.7e9 + step * 0.1234567,
            **({"val_loss": 3.1 + 1 / step} if step % 100 == 0 else {})}


def _steps(points) -> list[int]:
    return [p["step"] for p in points]


def test_a_run_longer_than_the_old_16_mib_record_keeps_its_owner_over_the_api(tmp_path, tiny_ab):
    long = [_point(s) for s in range(1, 70_001)]  # ~70K steps: its history alone is over 16 MiB

    def prepare(studio):
        save_adapter(tiny_ab, "a", studio.library.root / "long", LX, "tiny",
                     {"user": "ann", "steps": len(long), "history": long})

    with served_studio(tmp_path, auth=USERS, before_build=prepare) as (url, studio):
        entry = studio.library.details("long")
        assert entry["user"] == "ann" and entry["problem"] is None and entry["status"] != "unreadable"
        bob = Client(url, auth=USERS[1], verbose=False)
        bob.predict("long", "bobs", api_name="/rename_adapter")  # refused: not his
        bob.predict("long", api_name="/delete_adapter")
        bob.close()
        assert studio.library.names() == ["long"]
        folder = studio.library.root / "long"  # the record stays small; the history is beside it, whole
        assert (folder / META).stat().st_size < 64 * 1024 < (folder / HISTORY).stat().st_size
        assert list(studio.library.history("long")) == long


def test_each_checkpoint_writes_only_its_new_steps(tiny, sample_ds, tmp_path):
    run = tmp_path / "run"
    train_to_end(Trainer(tiny, sample_ds, LoraConfig(r=2), quick(steps=12, **EVERY_2), "run", run))
    cks = checkpoint_dirs(run)
    assert [checkpoint_step(c) for c in cks] == [2, 4, 6, 8, 10, 12]
    records = [(c / META).stat().st_size for c in cks]
    states = [(c / TRAINER_STATE).stat().st_size for c in cks]
    # the files a checkpoint writes stay the same size as the run goes on: the history is not in them
    assert max(records) - min(records) < 32 and max(states) - min(states) < 128, (records, states)
    for c in cks:  # its history is the run's file itself (no copy), of which it reads its own steps
        assert os.path.samefile(c / HISTORY, run / HISTORY)
        assert _steps(run_record.history(c)) == list(range(1, checkpoint_step(c) + 1))
    lines = (run / HISTORY).read_bytes().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 13))  # each step written once


def test_a_resume_from_an_older_checkpoint_continues_its_history_not_the_later_one(tiny, sample_ds, tmp_path):
    run = tmp_path / "run"
    train_to_end(Trainer(tiny, sample_ds, LoraConfig(r=2), quick(steps=8, **EVERY_2), "run", run))
    first = list(run_record.history(run))
    train_to_end(Trainer(tiny, sample_ds, None, quick(steps=6, **EVERY_2), "", run, resume=checkpoint_path(run, 4)))
    again = list(run_record.history(run))
    assert _steps(again) == [1, 2, 3, 4, 5, 6]
    assert again[:4] == first[:4] and again[4]["wall_time"] > first[-1]["wall_time"]  # 5 and 6 trained anew
    assert list(run_record.history(checkpoint_path(run, 6))) == again  # the new step-6 checkpoint
    assert list(run_record.history(checkpoint_path(run, 8))) == first  # the later one keeps its own


def _as_written_before(folder) -> None:
    """Rewrite a record as it was before history.jsonl: the history inline in studio.json (and, in a
    checkpoint, in trainer_state.pt too)."""
    meta = json.loads((folder / META).read_text())
    history = list(run_record.history(folder, meta))
    del meta["history_bytes"]
    (folder / META).write_text(json.dumps({**meta, "history": history}, indent=2))
    if (folder / TRAINER_STATE).is_file():
        state = torch.load(folder / TRAINER_STATE, weights_only=True)
        torch.save({**state, "history": history}, folder / TRAINER_STATE)
    (folder / HISTORY).unlink()


def test_an_older_record_with_its_history_inline_reads_copies_and_resumes(tiny, sample_ds, tmp_path):
    lib = Library(tmp_path / "lib")
    run = lib.root / "old"
    train_to_end(Trainer(tiny, sample_ds, LoraConfig(r=2), quick(steps=4, **EVERY_2), "old", run, meta={"user": "ann"}))
    history = list(run_record.history(run))
    for folder in (*checkpoint_dirs(run), run):
        _as_written_before(folder)
    assert lib.details("old")["user"] == "ann" and list(lib.history("old")) == history
    points, evals = lib.curve("old")
    assert _steps(points) == [1, 2, 3, 4] and _steps(evals) == [0, *(p["step"] for p in history if "val_loss" in p)]
    lib.duplicate("old", "copy", user="bob")  # a copy is written as records are now
    assert "history" not in json.loads((lib.root / "copy" / META).read_text())
    assert list(lib.history("copy")) == history and lib.details("copy")["user"] == "bob"
    train_to_end(Trainer(tiny, sample_ds, None, quick(steps=6, **EVERY_2), "", run, resume=run))
    assert _steps(run_record.history(run)) == [1, 2, 3, 4, 5, 6]
    assert list(run_record.history(run))[:4] == history


def test_a_checkpoint_exports_and_imports_with_its_own_history(tiny, sample_ds, tmp_path):
    lib = Library(tmp_path / "lib")
    train_to_end(Trainer(tiny, sample_ds, LoraConfig(r=2), quick(steps=4, **EVERY_2), "run", lib.root / "run"))
    out = lib.export_zip("run@step_000002", tmp_path / "out")
    with zipfile.ZipFile(out) as zf:
        assert _steps(map(json.loads, zf.read(HISTORY).splitlines())) == [1, 2]
    lib.import_path(out, "back")
    assert list(lib.history("back")) == list(lib.history("run@step_000002"))
    assert _steps(lib.history("run")) == [1, 2, 3, 4]


def test_history_lines_that_are_not_sound_points_are_skipped(tmp_path):
    good = [_point(1), _point(2)]
    (tmp_path / HISTORY).write_bytes(b"".join(run_record.encode(good[:1])) + b'{"step": "x"}\n[1]\n'
                                     + b"x" * (run_record.MAX_LINE * 2) + b"\n{bad json\n"
                                     + b"".join(run_record.encode(good[1:])) + b'{"step": 3, "lo')
    assert list(run_record.history(tmp_path, {})) == good  # the torn tail (a crash mid-append) too
    assert list(run_record.history(tmp_path, {"history_bytes": len(b"".join(run_record.encode(good[:1])))})) == good[:1]


def test_the_chart_of_a_run_with_100k_evaluations_stays_bounded():
    points = [{"step": s, "loss": 5 - s * 1e-5, "lr": 1e-3} for s in range(1, 100_001)]
    evals = [{"step": s, "val_loss": 4 + (s * 7919 % 1000) / 1000} for s in range(1, 100_001)]
    fig = loss_figure(points, evals, 100_000)
    train, val = fig.data[0], fig.data[1]
    assert len(train.x) <= CHART_POINTS + 2 and len(val.x) <= CHART_POINTS + 2
    assert val.x[-1] == train.x[-1] == 100_000  # the newest point is drawn
    assert min(val.y) == 4.0 and min(train.y) == points[-1]["loss"]  # and the lowest
    assert len(fig.to_json()) < 300_000
    short = loss_figure(points[:10], evals[:10])
    assert list(short.data[1].x) == list(range(1, 11))  # a short run is drawn whole


@pytest.mark.parametrize("n", [0, 1, 5, CHART_POINTS, CHART_POINTS + 1, 10 * CHART_POINTS + 3])
def test_thinning_keeps_order_the_last_and_the_lowest(n):
    points = [{"step": s, "v": (s * 37) % 101} for s in range(n)]
    kept = run_record.thin(points, "v")
    assert len(kept) == n if n <= CHART_POINTS else CHART_POINTS // 2 <= len(kept) <= CHART_POINTS + 2
    assert _steps(kept) == sorted(set(_steps(kept)))
    if n:
        assert kept[-1] is points[-1] and min(p["v"] for p in kept) == min(p["v"] for p in points)
