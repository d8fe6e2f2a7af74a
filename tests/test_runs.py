"""Training runs: one checkpoint listing and path rule, the trainer's extra metadata, Trainer.setup()."""
from __future__ import annotations

import json
import os
import threading


from core.adapters.format import CONFIG, META, WEIGHTS
from core.adapters.library import (LOADABLE, RESUMABLE, TRAINER_STATE, Library, checkpoint_dirs, checkpoint_path,
                                   checkpoint_step)
from core.lora.layers import adapter_names, lora_parameters
from core.lora.config import LoraConfig
from core.train.config import TrainConfig
from core.train.trainer import Trainer, find_checkpoint
from train_helpers import quick, train_solo


def small(**kw) -> TrainConfig:
    return quick(**{"steps": 4, "eval_interval": 2, "checkpoint_interval": 2, **kw})


def fake_checkpoint(folder, files) -> None:
    folder.mkdir(parents=True)
    for f in files:
        (folder / f).write_text("{}")


# ---- one listing, one path rule ---------------------------------------------------------------

def test_checkpoints_are_listed_one_way_in_a_library_or_any_folder(tmp_path):
    for run in (tmp_path / "lib" / "run", tmp_path / "elsewhere"):
        ck = run / "checkpoints"
        fake_checkpoint(ck / "step_000010", (*LOADABLE, TRAINER_STATE))
        fake_checkpoint(ck / "step_000002", (*LOADABLE, TRAINER_STATE))
        fake_checkpoint(ck / "step_000004", LOADABLE)  # an adapter, no resume state
        fake_checkpoint(ck / "step_000006", (TRAINER_STATE,))  # a resume state, no adapter
        fake_checkpoint(ck / "final", (*LOADABLE, TRAINER_STATE))  # not step_<digits>
        fake_checkpoint(ck / "step_12a", (*LOADABLE, TRAINER_STATE))
        (ck / "step_000008").mkdir()  # empty
        fake_checkpoint(tmp_path / f"outside-{run.name}", (*LOADABLE, TRAINER_STATE))
        os.symlink(tmp_path / f"outside-{run.name}", ck / "step_000020")  # links are never followed
        assert [c.name for c in checkpoint_dirs(run)] == ["step_000002", "step_000004", "step_000010"]
        assert [c.name for c in checkpoint_dirs(run, RESUMABLE)] == ["step_000002", "step_000006", "step_000010"]
        assert [checkpoint_step(c) for c in checkpoint_dirs(run)] == [2, 4, 10]
    lib = Library(tmp_path / "lib")
    assert [c["name"] for c in lib.checkpoints("run")] == ["step_000002", "step_000004", "step_000010"]
    assert [c["step"] for c in lib.checkpoints("run")] == [2, 4, 10]
    assert lib.list()[0].n_checkpoints == 3


def test_a_linked_checkpoints_folder_lists_nothing(tmp_path):
    fake_checkpoint(tmp_path / "real" / "step_000002", (*LOADABLE, TRAINER_STATE))
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "run" / "checkpoints")
    assert checkpoint_dirs(tmp_path / "run") == [] and checkpoint_dirs(tmp_path / "run", RESUMABLE) == []
    assert checkpoint_dirs(tmp_path / "missing") == []


def test_the_trainer_saves_where_checkpoint_path_says_and_prunes_by_the_same_listing(tiny, sample_ds, tmp_path):
    run = tmp_path / "run"
    events = train_solo(Trainer(tiny, sample_ds, LoraConfig(), small(steps=8, keep_checkpoints=2), "a", run))
    paths = [e["path"] for e in events if e["type"] == "checkpoint"]
    assert paths == [str(checkpoint_path(run, s)) for s in (2, 4, 6, 8)]
    kept = [checkpoint_path(run, 6), checkpoint_path(run, 8)]
    assert checkpoint_dirs(run) == checkpoint_dirs(run, RESUMABLE) == kept  # each is loadable and resumable
    assert find_checkpoint(run).path == kept[-1]
    assert all((c / f).is_file() for c in kept for f in (WEIGHTS, CONFIG, META, TRAINER_STATE))


# ---- the trainer's extra metadata -------------------------------------------------------------

def test_extra_metadata_is_written_over_the_trainers_own_in_every_studio_json(tiny, sample_ds, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny, sample_ds, LoraConfig(), small(), "train:mine", run,
                      meta={"name": "mine", "user": "alice"})
    train_solo(trainer)
    assert "train:mine" in adapter_names(tiny)  # the adapter is trained under the name it was given
    for folder in (run, *checkpoint_dirs(run)):
        meta = json.loads((folder / META).read_text())
        assert meta["name"] == "mine" and meta["user"] == "alice" and meta["steps"] in (2, 4)
    assert find_checkpoint(run).name == "mine"


def test_the_studio_trains_with_the_core_trainer(tmp_path, sample_ds):
    from core.api import Runs, Engine
    eng = Engine("cpu", tmp_path / "lib")
    runner = Runs(eng, lambda base_id: eng.base(base_id, pin=True))
    job = runner.start("tiny", sample_ds, "run1", LoraConfig(), small(), user="bob")
    runner.wait(120)
    assert job.state == "finished"
    meta = eng.library.details("run1")["meta"]
    assert meta["name"] == "run1" and meta["user"] == "bob"


# ---- setup -------------------------------------------------------------------------------------

def test_setup_adds_the_adapter_once_and_run_continues_from_it(tiny, sample_ds, tmp_path):
    from core.model.weights import load_base
    expected = [e["loss"] for e in train_solo(Trainer(load_base("tiny", "cpu"), sample_ds, LoraConfig(), small(),
                                                      "a", tmp_path / "one")) if e["type"] == "step"]
    trainer = Trainer(tiny, sample_ds, LoraConfig(), small(), "a", tmp_path / "two")
    assert "a" not in adapter_names(tiny)
    trainer.setup()
    assert "a" in adapter_names(tiny)
    params = lora_parameters(tiny, "a")
    trainer.setup()  # a second call changes nothing
    assert all(p is q for p, q in zip(params, lora_parameters(tiny, "a")))
    events = train_solo(trainer)
    assert events[0]["type"] == "start" and events[-1]["status"] == "finished"
    assert [e["loss"] for e in events if e["type"] == "step"] == expected


def test_the_runner_calls_setup_under_the_engine_lock(tmp_path, sample_ds, monkeypatch):
    from core.engine import Engine
    from core.api import Runs
    eng = Engine("cpu", tmp_path / "lib")
    seen = []
    real_setup = Trainer.setup

    def spying_setup(self):
        other = []  # another thread cannot take the engine lock while setup runs

        def try_lock():
            other.append(eng.lock.acquire(blocking=False))
            if other[0]:
                eng.lock.release()
        t = threading.Thread(target=try_lock)
        t.start()
        t.join()
        seen.append(other[0])
        real_setup(self)
    monkeypatch.setattr(Trainer, "setup", spying_setup)
    runner = Runs(eng)  # the default base: engine.base(base_id, pin=True)
    job = runner.start("tiny", sample_ds, "run1", LoraConfig(), small(steps=2))
    runner.wait(120)
    assert seen[0] is False and job.state == "finished"  # the first call does the work (run() calls it again)


def test_the_cli_resumes_a_studio_run_as_a_job_of_the_same_runs_keeping_its_user_and_sharing(prepared, tmp_path):
    """finetune is a client of core's Runs, as the studio is: a run a signed-in user started and shared keeps
    both when the CLI continues it."""
    from core.__main__ import main
    from core.api import Engine, Runs, load_dataset
    lib = tmp_path / "lib"
    eng = Engine("cpu", lib)
    runs = Runs(eng)
    runs.start("tiny", load_dataset(prepared), "alices", LoraConfig(r=4, alpha=8), small(steps=2), owner="alice",
               user="alice")
    assert runs.wait(120)["state"] == "finished"
    runs.close()
    eng.library.set_shared("alices", True)
    assert main(["finetune", "--resume", "alices", "--library", str(lib), "--steps", "4"]) == 0
    meta = json.loads((lib / "alices" / META).read_text())
    assert meta["steps"] == 4 and meta["user"] == "alice" and meta["shared"] is True
