"""A full disk (ENOSPC, simulated for one job only) during co-batched training: that job fails alone with
a message that says what is kept, its earlier checkpoints and run folder stay, and the job beside it
finishes as it would alone. Free space is checked before a save, and a job is refused at start when the
disk is nearly full. Per-user quotas on the library and the datasets refuse one student's copies past
their cap with one sentence, and change nothing."""
from __future__ import annotations

import errno
import json
import shutil
import threading
import time
from collections import namedtuple
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

import core.atomic
from core.adapters.library import RESUMABLE, checkpoint_dirs
from core.lora.layers import adapter_state_dict
from core.lora.config import LoraConfig
from core.model.weights import load_base
from core.train.jobs import JobSpec, TrainScheduler
from core.train.trainer import Trainer
from studio_helpers import _prepare, _start
from studio_server import served_studio
from train_helpers import quick, train_solo

# two identical settings: co-batched, the job beside the failing one must stay what it is alone
JOB = (LoraConfig(r=4, alpha=8, targets=("attn.c_attn",)),
       quick(steps=6, batch_size=2, seq_len=16, grad_accum=2, eval_interval=2, checkpoint_interval=2, seed=1))
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
Usage = namedtuple("Usage", "total used free")


def _disk_full_for(monkeypatch, folder: Path, after_checkpoints: int) -> None:
    """Every file written under `folder` fails with ENOSPC once it holds `after_checkpoints` checkpoints;
    every other write goes on."""
    real = core.atomic.write_bytes

    def write_bytes(path, data):
        if Path(path).is_relative_to(folder) and len(checkpoint_dirs(folder, RESUMABLE)) >= after_checkpoints:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(core.atomic, "write_bytes", write_bytes)


def _alone(ds, folder: Path, name: str):
    model = load_base("tiny", device="cpu")
    events = train_solo(Trainer(model, ds, *JOB, name, folder / f"alone-{name}"))
    return [e["loss"] for e in events if e["type"] == "step"], adapter_state_dict(model, name)


def _co_batched(ds, folder: Path):
    """Jobs 'ok' and 'full' co-batched on one base, both queued before either starts."""
    model, gate = load_base("tiny", device="cpu"), threading.Event()

    def load(spec):
        gate.wait(30)
        return model
    sched = TrainScheduler(load, capacity_tokens=10_000)
    jobs = [sched.submit(JobSpec(n, "tiny", ds, *JOB, folder / n, user=n)) for n in ("ok", "full")]
    gate.set()
    for job in jobs:
        assert job.wait(120)
    sched.close()
    return [j.snapshot() for j in jobs]


def test_a_full_disk_fails_that_job_alone_and_the_other_trains_as_alone(sample_ds, tmp_path, monkeypatch):
    want_losses, want_tensors = _alone(sample_ds, tmp_path, "ok")
    _disk_full_for(monkeypatch, tmp_path / "full", after_checkpoints=1)  # its step-2 checkpoint is saved
    ok, full = _co_batched(sample_ds, tmp_path)

    assert full["state"] == "failed" and full["progress"]["step"] == 4, full
    assert full["message"] == ("training stopped at step 4: not enough disk space to save (No space left on "
                               "device); its checkpoint of step 2 is kept, so free some space, then Resume.")
    assert [c.name for c in checkpoint_dirs(tmp_path / "full", RESUMABLE)] == ["step_000002"]
    assert [p["loss"] for p in full["points"]] == pytest.approx(want_losses[:4], abs=1e-5)  # its own steps, right

    assert ok["state"] == "finished", ok["message"]
    assert [p["loss"] for p in ok["points"]] == pytest.approx(want_losses, abs=1e-5)
    got = {k.removeprefix("base_model.model."): v
           for k, v in load_file(str(tmp_path / "ok" / "adapter_model.safetensors")).items()}
    for k, v in want_tensors.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0)


# ---- the studio: a run folder holding a checkpoint is kept; starting under the floor is refused --------

def test_a_studio_run_that_saved_a_checkpoint_keeps_its_folder_and_says_so(studio, monkeypatch):
    _prepare(studio)
    run = studio.library.root / "half"
    _disk_full_for(monkeypatch, run, after_checkpoints=1)
    _start(studio, "half", 120)  # the studio checkpoints every 50 steps
    snap = studio.runs.wait(180)
    assert snap["state"] == "failed" and snap["progress"]["step"] == 100, snap
    assert snap["message"].startswith("training stopped at step 100: not enough disk space to save")
    assert "its checkpoint of step 50 is kept, so free some space, then Resume." in snap["message"]
    assert [c.name for c in checkpoint_dirs(run, RESUMABLE)] == ["step_000050"]  # the hold let go, the work stays
    entry = next(e for e in studio.library.list() if e.name == "half")
    assert entry.status == "interrupted (can resume)" and entry.n_checkpoints == 1
    monkeypatch.undo()
    studio.runs.resume("tiny", studio.dataset_store.load("pirates"), "half")
    assert studio.runs.wait(180)["state"] == "finished"


def test_a_studio_run_that_saved_nothing_says_so_and_frees_its_name(studio, monkeypatch):
    _prepare(studio)
    _disk_full_for(monkeypatch, studio.library.root / "none", after_checkpoints=0)
    _start(studio, "none", 3)
    snap = studio.runs.wait(180)
    assert snap["state"] == "failed" and snap["progress"]["step"] == 3, snap
    assert snap["message"] == ("training stopped at step 3: not enough disk space to save (No space left on "
                               "device); no checkpoint had been saved yet, so free some space and start it again.")
    assert not (studio.library.root / "none").exists()


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(100 << 30, (100 << 30) - free, free))


def test_a_checkpoint_is_not_begun_without_room_for_it(studio, monkeypatch):
    _prepare(studio)
    real, writes = core.atomic.write_bytes, []
    monkeypatch.setattr(core.atomic, "write_bytes", lambda path, data: (writes.append(path), real(path, data)))
    from core.quota import Quota
    studio.library.quota = Quota()  # no floor at start: the save's own check is what is tested
    _free(monkeypatch, 10_000)  # less than one checkpoint of the tiny model
    _start(studio, "tight", 3)
    snap = studio.runs.wait(180)
    assert snap["state"] == "failed" and "not enough disk space" in snap["message"], snap
    assert not [p for p in writes if "tight" in str(p)]  # refused before the first byte, not midway


def test_starting_a_run_is_refused_when_the_disk_is_nearly_full(studio, monkeypatch):
    from studio_helpers import refused
    _prepare(studio)
    studio.base("tiny")
    _free(monkeypatch, 300 << 20)  # under the default floor, 1 GB
    msg = refused(studio, ValueError, r"^the server's disk is nearly full \(300\.0 MB free, 1\.0 GB is kept free "
                                      r"for everyone\), so nothing was saved", _start, studio, "late", 3)
    assert msg.count(". ") == 0  # one sentence
    assert not (studio.library.root / "late").exists()
    from studio.tabs import library
    refused(studio, ValueError, r"^the server's disk is nearly full", library.export_zip, studio, "anything")


# ---- per-user quotas, through the served studio ---------------------------------------------------

USERS = [("ann", "pw-ann"), ("bob", "pw-bob"), ("teach", "pw-teach")]


def _call(url: str, user: tuple[str, str], api_name: str, data: list) -> tuple[list | None, list[str]]:
    """One event through the served queue as signed-in `user`: its outputs and the warning toasts it showed."""
    cookies = httpx.post(url + "login", data={"username": user[0], "password": user[1]}, timeout=30).cookies
    config = httpx.get(url + "config", cookies=cookies, timeout=30).json()
    index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
    session = f"{user[0]}-{api_name}-{time.monotonic_ns()}"
    join = httpx.post(url + "gradio_api/queue/join", cookies=cookies, timeout=30,
                      json={"data": data, "fn_index": index, "session_hash": session})
    assert join.status_code == 200, join.text
    toasts = []
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, cookies=cookies,
                      timeout=120) as r:
        for line in r.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("msg") == "log":
                toasts.append(msg["log"])
            if msg.get("msg") == "process_completed":
                assert msg.get("success"), msg
                return msg["output"]["data"], toasts
    raise AssertionError(f"{api_name} never completed")


def _seed(studio):
    """ann's adapter 'a0' (trained) and the caps: 2 adapters, 2 datasets per user; 'teach' is an admin."""
    from core.quota import Limit, Quota
    from core.train.data import load_dataset
    quota = Quota(adapters=Limit(count=2), datasets=Limit(count=2), admins=frozenset({"teach"}))
    studio.quota = studio.library.quota = studio.dataset_store.quota = quota
    studio.admins = frozenset({"teach"})
    _prepare(studio, "d0")
    studio.runs.start("tiny", load_dataset(studio.dataset_path("d0")), "a0", LoraConfig(r=4, alpha=8),
                        quick(steps=2, batch_size=2, seq_len=32, eval_interval=0), user="ann")
    assert studio.runs.wait(120)["state"] == "finished"


def test_quotas_refuse_a_users_copies_and_datasets_with_one_sentence_and_change_nothing(tmp_path):
    from studio_helpers import unchanged
    text = "Ahoy, the pirate said, and the parrot repeated it. " * 60
    with served_studio(tmp_path, auth=USERS, before_build=_seed) as (url, studio):
        _call(url, USERS[0], "duplicate_adapter", ["a0", "a1"])  # ann's second adapter: within the cap
        for n in ("d1", "d2"):
            _call(url, USERS[0], "prepare_dataset", [None, text, 0.9, n])
        assert {e.name: e.user for e in studio.library.list()} == {"a0": "ann", "a1": "ann"}
        with unchanged(studio):
            _, toasts = _call(url, USERS[0], "duplicate_adapter", ["a0", "a2"])
            assert toasts == ["You already have 2 adapters here, the most one user may keep; delete some you no "
                              "longer need first."]
            _, toasts = _call(url, USERS[0], "prepare_dataset", [None, text, 0.9, "d3"])
            assert toasts == ["You already have 2 datasets here, the most one user may keep; delete some you no "
                              "longer need first."]
        # another user's quota is their own; an admin has none
        _call(url, USERS[0], "share_adapter", ["a0", True])  # so that bob may copy it
        _call(url, USERS[1], "duplicate_adapter", ["a0", "bobs"])
        _call(url, USERS[1], "prepare_dataset", [None, text, 0.9, "bobs-data"])
        for n in ("t1", "t2", "t3"):
            _call(url, USERS[2], "duplicate_adapter", ["a0", n])
        owners = {e.name: e.user for e in studio.library.list()}
        assert owners == {"a0": "ann", "a1": "ann", "bobs": "bob", "t1": "teach", "t2": "teach", "t3": "teach"}
        assert {d["name"]: d["meta"].get("user") for d in studio.dataset_store.list()} == {
            "d0": None, "d1": "ann", "d2": "ann", "bobs-data": "bob"}


def test_a_users_size_cap_refuses_a_copy_that_would_pass_it_and_leaves_nothing(tmp_path):
    from core.adapters.library import Library
    from core.quota import Limit, Quota, QuotaError, folder_bytes
    from core.lora.layers import add_adapter
    model, lcfg = load_base("tiny", device="cpu"), LoraConfig(r=4, alpha=8)
    add_adapter(model, "a", lcfg, seed=1)
    lib = Library(tmp_path / "lib")
    lib.save(model, "a", "a0", lcfg, "tiny", {"user": "ann"})
    size = folder_bytes(lib.root / "a0")
    lib.quota = Quota(adapters=Limit(bytes=int(size * 1.5)))
    before = sorted(p.name for p in lib.root.iterdir())
    with pytest.raises(QuotaError, match=r"^your adapters take [0-9.]+ KB of the [0-9.]+ KB one user may keep and "
                                         r"this needs [0-9.]+ KB more; delete some you no longer need first\.$"):
        lib.duplicate("a0", "a1", user="ann")
    assert sorted(p.name for p in lib.root.iterdir()) == before  # no copy, no temp folder left
    lib.duplicate("a0", "b1", user="bob")  # bob's quota is his own
    assert {e.name: e.user for e in lib.list()} == {"a0": "ann", "b1": "bob"}
