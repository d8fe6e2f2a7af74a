"""Trackers: a run's events logged to TensorBoard, wandb (offline) and trackio (local) (--report-to, the Train
tab's "Log to"), read back with each package's own reader; no tracker opens a network connection; a missing
package is one line saying what to install; a tracker that fails never stops training."""
from __future__ import annotations

import importlib.util
import json
import socket
import struct
import sys

import pytest

from cli_helpers import TINY_RUN, one_line_error
from core.adapters import run_record
from core.__main__ import main
from core.lora.config import LoraConfig
from core.train.jobs import JobSpec, TrainScheduler
from core.train.trackers import PROJECT, TENSORBOARD_DIR, WANDB_DIR, make_trackers
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
    return list(run_record.history(run))


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
    with pytest.raises(ValueError, match="choose one of none, tensorboard, wandb, trackio"):
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


@pytest.fixture
def offline(monkeypatch):
    """Any connection to a host other than this machine fails (wandb talks to its own local service), and the
    environment variables the trackers set are restored afterwards."""
    real = socket.socket.connect

    def connect(sock, address):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a tracker tried to reach {address}")
        return real(sock, address)
    monkeypatch.setattr(socket.socket, "connect", connect)
    for var in ("WANDB_MODE", "WANDB_SILENT", "WANDB_CONSOLE", "WANDB_DISABLE_GIT", "WANDB_DISABLE_CODE",
                "WANDB_CONFIG_DIR", "TRACKIO_DIR", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(var, raising=False)


def _wandb_history(run, offline_run=None) -> list[dict]:
    """The history rows of an offline run (the only one in <run>/wandb/ by default), decoded from its .wandb
    file: a LevelDB-style log of wandb's own protobuf Records (after a 7-byte ':W&B' header; 32 KiB blocks of
    7-byte-framed chunks)."""
    from wandb.proto import wandb_internal_pb2
    (path,) = (offline_run or run / WANDB_DIR).glob("**/run-*.wandb")
    data, pos, chunk, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_the_cli_logs_every_step_and_evaluation_to_an_offline_wandb_run(prepared, tmp_path, capsys, offline):
    pytest.importorskip("wandb")
    lib = tmp_path / "lib"
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(lib), "--output", "wb",
                 "--report-to", "wandb"]) == 0
    rows, history = _wandb_history(lib / "wb"), _history(lib / "wb")
    steps = [r for r in rows if "train/loss" in r]
    assert [r["_step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for field in ("loss", "lr", "grad_norm", "tokens_per_sec"):  # JSON floats: exact
        assert [r[f"train/{field}"] for r in steps] == [h[field] for h in history]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["_step"] for r in evals] == [0, 3, 6]  # before training, then every 3 steps
    assert [r["eval/loss"] for r in evals][1:] == [h["val_loss"] for h in history if "val_loss" in h]


def test_an_offline_wandb_run_keeps_no_record_of_the_servers_packages_or_host(tmp_path, offline):
    """The run folder is the user's; the server's installed packages, host name and command line are not."""
    pytest.importorskip("wandb")
    (tracker,) = make_trackers("wandb", tmp_path / "run")
    tracker({"type": "start", "step": 0})
    tracker({"type": "step", "step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_sec": 10.0})
    tracker({"type": "done", "step": 1})
    files = [f for f in (tmp_path / "run" / WANDB_DIR).rglob("*") if f.is_file()]
    assert [r["train/loss"] for r in _wandb_history(tmp_path / "run") if "train/loss" in r] == [2.5]  # it logged
    server_facts = ("requirements.txt", "wandb-metadata.json", "conda-environment.yaml")
    assert not [f.name for f in files if f.name in server_facts]
    run_log = next(f for f in files if f.suffix == ".wandb").read_bytes()
    assert b"torch" not in run_log and sys.executable.encode() not in run_log


def test_the_cli_logs_every_step_and_evaluation_to_a_local_trackio_database(prepared, tmp_path, capsys, offline):
    if importlib.util.find_spec("trackio") is None:  # not importorskip: importing it would fix its store now
        pytest.skip("trackio is not installed")
    imported_before = "trackio" in sys.modules  # then its store was fixed by whoever imported it first
    lib = tmp_path / "lib"
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(lib), "--output", "tio",
                 "--report-to", "trackio"]) == 0
    from trackio.sqlite_storage import SQLiteStorage
    if not imported_before:  # the default store: in the library, beside the runs
        assert (lib / ".trackio" / f"{PROJECT}.db").is_file()
    logs, history = SQLiteStorage.get_logs(PROJECT, "tio"), _history(lib / "tio")
    steps = [r for r in logs if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for field in ("loss", "lr", "grad_norm", "tokens_per_sec"):
        assert [r[f"train/{field}"] for r in steps] == pytest.approx([h[field] for h in history], rel=1e-12)
    evals = [r for r in logs if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert [r["eval/loss"] for r in evals][1:] == pytest.approx([h["val_loss"] for h in history if "val_loss" in h])
    assert "Trackio" not in capsys.readouterr().out  # its banner does not interleave with the CLI's lines


@pytest.mark.parametrize("package", ["wandb", "trackio"])
def test_a_missing_wandb_or_trackio_package_is_one_line_saying_what_to_install(package, prepared, tmp_path,
                                                                                capsys, monkeypatch, offline):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    err = one_line_error(capsys, ["finetune", "--data", prepared, *TINY_RUN, "--library", tmp_path / "lib",
                                  "--output", "run", "--report-to", package])
    assert f"pip install {package}" in err
    assert not (tmp_path / "lib" / "run").exists()  # refused before anything was made


def test_a_resumed_run_continues_its_trackio_run_and_starts_a_new_offline_wandb_run(prepared, tmp_path, capsys,
                                                                                    offline):
    pytest.importorskip("wandb")
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    lib = tmp_path / "lib"
    for tracker in ("wandb", "trackio"):
        run = f"re-{tracker}"
        assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--library", str(lib), "--output", run,
                     "--report-to", tracker]) == 0
        assert main(["finetune", "--resume", run, "--library", str(lib), "--steps", "9", "--model", "tiny",
                     "--report-to", tracker]) == 0
    losses = [h["loss"] for h in _history(lib / "re-wandb")]
    steps = lambda w: [r["_step"] for r in _wandb_history(lib / "re-wandb", w) if "train/loss" in r]  # noqa: E731
    # folder names hold the start second, then a random id: two runs in one second sort by chance, so by steps
    wandb_runs = sorted((lib / "re-wandb" / WANDB_DIR).glob("offline-run-*"), key=lambda w: steps(w)[:1])
    assert len(wandb_runs) == 2
    assert [steps(w) for w in wandb_runs] == [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
    assert [r["train/loss"] for w in wandb_runs for r in _wandb_history(lib / "re-wandb", w)
            if "train/loss" in r] == losses
    from trackio.sqlite_storage import SQLiteStorage
    logs = [r for r in SQLiteStorage.get_logs(PROJECT, "re-trackio") if "train/loss" in r]
    assert [r["step"] for r in logs] == list(range(1, 10))  # one trackio run, each step once
    assert [r["train/loss"] for r in logs] == pytest.approx([h["loss"] for h in _history(lib / "re-trackio")],
                                                             rel=1e-12)


def test_two_jobs_logging_at_once_from_one_thread_keep_their_own_runs(tmp_path, offline):
    """The studio's co-batched jobs report from one scheduler thread, interleaved."""
    pytest.importorskip("wandb")
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed")
    lib = tmp_path / "lib"
    for kind in ("wandb", "trackio"):
        a, b = make_trackers(kind, lib / f"{kind}-a")[0], make_trackers(kind, lib / f"{kind}-b")[0]
        for t in (a, b):
            t({"type": "start", "step": 0})
        for step in (1, 2, 3):
            for offset, t in ((0.0, a), (10.0, b)):
                t({"type": "step", "step": step, "loss": step + offset, "lr": 0.1, "grad_norm": 1.0,
                   "tokens_per_sec": 100.0})
        a({"type": "done"})
        b({"type": "done"})
    from trackio.sqlite_storage import SQLiteStorage
    for name, offset in (("a", 0.0), ("b", 10.0)):
        assert [(r["_step"], r["train/loss"]) for r in _wandb_history(lib / f"wandb-{name}")] \
            == [(s, s + offset) for s in (1, 2, 3)]
        assert [(r["step"], r["train/loss"]) for r in SQLiteStorage.get_logs(PROJECT, f"trackio-{name}")] \
            == [(s, s + offset) for s in (1, 2, 3)]
