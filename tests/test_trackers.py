"""Trackers: a run's events logged to TensorBoard (--report-to tensorboard, the Train tab's "Log to"),
read back with tensorboard's own event reader; a missing package is one line saying what to install; a
tracker that fails never stops training."""
from __future__ import annotations

import json
import sys

import pytest

from cli_helpers import TINY_RUN, one_line_error
from core.__main__ import main
from core.model.config import LoraConfig
from core.train.jobs import JobSpec, TrainScheduler
from core.train.trackers import TENSORBOARD_DIR, make_trackers
from core.train.trainer import Trainer
from studio_helpers import _prepare, _train
from train_helpers import quick

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in <run>/tensorboard/, as (step, value) in logged order."""
    acc = EventAccumulator(str(run / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _history(run) -> list[dict]:
    return json.loads((run / "studio.json").read_text())["history"]


def test_the_cli_logs_every_step_and_evaluation_to_tensorboard(prepared, tmp_path, capsys):
    lib = tmp_path / "lib"
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(lib), "--output", "tb",
                 "--report-to", "tensorboard"]) == 0
    tags, history = _scalars(lib / "tb"), _history(lib / "tb")
    for field in ("loss", "lr", "grad_norm", "tokens_per_sec"):  # float32 in the event file
        assert [s for s, _ in tags[f"train/{field}"]] == [1, 2, 3, 4, 5, 6]
        assert [v for _, v in tags[f"train/{field}"]] == pytest.approx([h[field] for h in history], rel=1e-6)
    assert [s for s, _ in tags["eval/loss"]] == [0, 3, 6]  # before training, then every 3 steps
    assert [v for _, v in tags["eval/loss"]][1:] == pytest.approx([h["val_loss"] for h in history if "val_loss" in h])


def test_the_train_tab_logs_to_tensorboard_when_chosen(studio):
    _prepare(studio)
    _train(studio, "logged", 6, report_to="tensorboard")
    _train(studio, "quiet", 2)
    run = studio.library.root / "logged"
    assert [s for s, _ in _scalars(run)["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert not (studio.library.root / "quiet" / TENSORBOARD_DIR).exists()  # "none" writes nothing


def test_a_missing_tensorboard_package_is_one_line_saying_what_to_install(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    err = one_line_error(capsys, ["finetune", "--data", prepared, *TINY_RUN, "--library", tmp_path / "lib",
                                  "--output", "tb", "--report-to", "tensorboard"])
    assert "pip install tensorboard" in err
    assert not (tmp_path / "lib" / "tb").exists()  # refused before anything was made
    with pytest.raises(ValueError, match="choose one of none, tensorboard"):
        make_trackers("wandb-typo", tmp_path)


def test_a_failing_tracker_is_dropped_with_a_note_and_training_goes_on(tiny, sample_ds, tmp_path):
    def broken(ev):
        if ev["type"] == "step":
            raise OSError(28, "No space left on device")
    seen = []
    trainer = Trainer(tiny, sample_ds, LoraConfig(r=2), quick(steps=3), "a", tmp_path / "run")
    scheduler = TrainScheduler(lambda spec: tiny)
    job = scheduler.submit(JobSpec("a", "tiny", sample_ds, trainer.lcfg, trainer.tcfg, trainer.out_dir,
                                   trainer=trainer, trackers=[broken, seen.append]))
    assert job.wait(120)
    scheduler.close()
    assert job.state == "finished" and any("logging to broken stopped" in n for n in job.notes)
    assert [e["step"] for e in seen if e["type"] == "step"] == [1, 2, 3] and seen[-1]["type"] == "done"
