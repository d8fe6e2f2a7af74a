"""Faults: a training process killed with SIGKILL resumes from its last checkpoint with the library
consistent; a full disk (ENOSPC, simulated) leaves the library and the datasets unchanged and says so;
NaN loss and out-of-memory (simulated) stop a studio run cleanly with the last good checkpoint kept.

(A reloaded page reattaching to a running job is checked in a real browser by test_browser.py.)
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import core.adapters.library
import core.atomic
from adapter_helpers import listing
from core.adapters import run_record
from core.adapters.format import WEIGHTS
from core.adapters.validate import AdapterError
from core.adapters.library import Library
from core.model.config import PRESETS
from core.train.data import SAMPLES_DIR, prepare
from core.lora.layers import adapter_names
from studio.app import create_studio
from studio.context import friendly
from studio.tabs import compare, data, library, train
from studio.tabs.compare import CompareForm
from cli_helpers import ROOT
from studio_helpers import _files, _prepare, _start, _train, unchanged

KILL_RUN = ["--model", "tiny", "--steps", "40", "--batch-size", "4", "--seq-len", "64", "--grad-accum", "1",
            "--lr", "5e-3", "--eval-interval", "10", "--checkpoint-interval", "5", "--log-interval", "1",
            "--seed", "11"]


def _finetune(*args, cwd) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "core", "finetune", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _history(run_dir) -> list[dict]:
    return list(run_record.history(run_dir))


# ---- Ctrl-C and SIGKILL mid-run -----------------------------------------------------------------

def test_ctrl_c_stops_the_cli_run_after_the_current_step_and_saves_it(tmp_path):
    ds, lib = tmp_path / "ds", tmp_path / "lib"
    prepare([SAMPLES_DIR / "pirate_recipes.txt"], ds)
    proc = _finetune("--data", ds, *KILL_RUN, "--steps", "100000", "--library", lib, "--output", "c", cwd=tmp_path)
    guard = threading.Timer(300, proc.kill)  # never hang the suite
    guard.start()
    try:
        for line in proc.stdout:
            if line.startswith("step ") and "| loss" in line:  # it trains: Ctrl-C
                proc.send_signal(signal.SIGINT)
                break
        out = _finish(proc)
    finally:
        guard.cancel()
    assert "stopping after the current step and saving" in out and "continue with: python -m core finetune" in out
    meta = json.loads((lib / "c" / "studio.json").read_text())
    assert meta["status"] == "stopped" and 1 <= meta["steps"] < 100000


# ---- SIGKILL mid-run ----------------------------------------------------------------------------

def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    ds, lib = tmp_path / "ds", tmp_path / "lib"
    prepare([SAMPLES_DIR / "pirate_recipes.txt"], ds)
    full = _finetune("--data", ds, *KILL_RUN, "--library", lib, "--output", "full", cwd=tmp_path)
    _finish(full)

    proc = _finetune("--data", ds, *KILL_RUN, "--library", lib, "--output", "cut", cwd=tmp_path)
    guard = threading.Timer(300, proc.kill)  # never hang the suite
    guard.start()
    killed_after = None
    try:
        for line in proc.stdout:
            if line.startswith("checkpoint:"):  # the first checkpoint is on disk: kill it mid-run
                proc.send_signal(signal.SIGKILL)
                killed_after = line.strip()
                break
        proc.communicate(timeout=60)
    finally:
        guard.cancel()
    assert killed_after and proc.returncode == -signal.SIGKILL, killed_after
    run = lib / "cut"
    assert not (run / WEIGHTS).exists(), "the run finished before it could be killed"

    # after a restart the library is consistent: the run is listed by its checkpoints, each of them whole
    studio = create_studio(lib, tmp_path / "datasets", "cpu", "tiny")
    entry = next(e for e in studio.library.list() if e.name == "cut")
    assert not entry.has_final and entry.status == "interrupted (can resume)" and entry.n_checkpoints >= 1
    for c in studio.library.checkpoints("cut"):
        studio.library.read(c["spec"], PRESETS["tiny"])  # validates every file of the checkpoint
    assert sorted(studio.library.names()) == ["cut", "full"]
    assert "cut" not in compare.compatible_adapters(studio, "tiny")  # no final adapter to compare yet
    assert [r[0] for r in library.table_rows(studio)] == studio.library.names()
    resume_from = studio.library.checkpoints("cut")[-1]["step"]
    assert 5 <= resume_from < 40

    out = _finish(_finetune("--resume", "cut", "--library", lib, cwd=tmp_path))
    assert f"resuming from step_{resume_from:06d}" in out and "finished after 40 steps" in out
    cut, ref = _history(run), _history(lib / "full")
    assert [h["step"] for h in cut] == [h["step"] for h in ref] == list(range(1, 41))
    for a, b in zip(cut, ref):  # the resumed run continues exactly where the uninterrupted one went
        assert abs(a["loss"] - b["loss"]) <= 1e-4 and a["lr"] == pytest.approx(b["lr"]), a["step"]
        assert (a.get("val_loss") is None) == (b.get("val_loss") is None)
    assert all(e.has_final and e.status == "finished" for e in Library(lib).list())


# ---- a full disk ----------------------------------------------------------------------------------

def _enospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


DISK = r"not enough disk space to (save|rename) .* in the library: No space left on device\. Nothing was changed"


def test_a_full_disk_leaves_the_library_unchanged_and_says_so(studio, monkeypatch):
    _prepare(studio)
    _train(studio, "src", 3)
    ckpt = library.details(studio, "src")[2]["value"]
    zipped = library.export_zip(studio, "src")
    actions = {
        "import": lambda: library.import_upload(studio, [zipped], "imported"),
        "duplicate": lambda: library.duplicate(studio, "src", "copy"),
        "blend": lambda: library.blend(studio, ["src", "src"], "0.5, 0.5", "blended"),
        "restore": lambda: library.restore_checkpoint(studio, "src", ckpt, "restored"),
    }
    with monkeypatch.context() as m:
        m.setattr(core.atomic, "write_bytes", _enospc)  # every file the library writes goes through it
        for what, action in actions.items():
            with unchanged(studio), pytest.raises(AdapterError, match=DISK):
                action()
            with unchanged(studio), pytest.warns(UserWarning, match="Not enough disk space"):
                friendly(action)()
    assert not [p for p in studio.library.root.iterdir() if p.name.startswith(".tmp-")]
    with monkeypatch.context() as m:
        m.setattr(core.adapters.library.os, "rename", _enospc)
        with unchanged(studio), pytest.raises(AdapterError, match=r"not enough disk space to rename 'src' to 'moved'"):
            library.rename(studio, "src", "moved")
    for action in actions.values():  # with room again, each works
        action()
    assert sorted(library.names(studio)) == ["blended", "copy", "imported", "restored", "src"]


def test_a_full_disk_while_preparing_a_dataset(studio, monkeypatch):
    text, _, state = data.sample_text("brainrot")
    before = _files(studio.datasets_dir)
    monkeypatch.setattr(core.atomic, "write_bytes", _enospc)
    with pytest.raises(OSError, match="No space left"):
        data.prepare(studio, state, text, 0.9, "rot")
    with pytest.warns(UserWarning, match=r"Not enough disk space \(No space left on device\); nothing was saved"):
        friendly(data.prepare)(studio, state, text, 0.9, "rot")
    assert _files(studio.datasets_dir) == before  # no half-written dataset folder, listed or hidden
    monkeypatch.undo()
    assert "Saved dataset **rot**" in data.prepare(studio, state, text, 0.9, "rot")


def test_a_full_disk_while_training_in_the_studio(studio, monkeypatch):
    _prepare(studio)
    monkeypatch.setattr(core.atomic, "write_bytes", _enospc)
    _start(studio, "no-room", 3)
    snap = studio.runs.wait(120)
    assert snap["state"] == "failed" and "not enough disk space" in snap["message"], snap["message"]
    assert "no-room" not in studio.library.names() and not (studio.library.root / "no-room").exists()
    assert not [n for n in adapter_names(studio.engine.model) if n.startswith("train:")]
    monkeypatch.undo()
    _train(studio, "no-room", 3)  # the name is free again, and training works once there is room


# ---- NaN loss and out of memory in a studio run -----------------------------------------------

def _fail_training_after(monkeypatch, model, steps: int, fail) -> None:
    """Make the training forward pass (grad enabled; evaluation and sampling are not) fail from step
    `steps` + 1 on; one micro-batch per step."""
    hidden, calls = model.hidden, []

    def patched(*a, **kw):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) > steps:
                return fail(hidden(*a, **kw))
        return hidden(*a, **kw)

    monkeypatch.setattr(model, "hidden", patched)


def _nan(h):
    return h * float("nan")


def _oom(h):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


@pytest.mark.parametrize("fault,expect", [
    (_nan, ["the loss became NaN at step 53", "step_000050 is kept", "lower learning rate (now 0.002)"]),
    (_oom, ["out of memory at batch size 2 x sequence length 32", "rank 4", "Lower the batch size",
            "smaller model size"]),
], ids=["nan", "oom"])
def test_a_failing_run_stops_cleanly_and_keeps_its_last_checkpoint(studio, monkeypatch, fault, expect):
    _prepare(studio)
    model = studio.base("tiny")
    _fail_training_after(monkeypatch, model, 52, fault)  # the studio checkpoints every 50 steps
    _start(studio, "faulty", 200)
    snap = studio.runs.wait(180)
    monkeypatch.undo()
    assert snap["state"] == "failed", snap["message"]
    for words in expect:
        assert words in snap["message"], snap["message"]
    assert "Failed" in train.job_html(snap) and [p["step"] for p in snap["points"]][-1] == 52
    assert not [n for n in adapter_names(model) if n.startswith("train:")] and studio.runs.busy() is None
    entry = next(e for e in studio.library.list() if e.name == "faulty")
    assert not entry.has_final and entry.n_checkpoints == 1
    assert [c["step"] for c in studio.library.checkpoints("faulty")] == [50]
    # the last good adapter is usable: keep it as an adapter and compare with it
    library.restore_checkpoint(studio, "faulty", "step_000050", "faulty-50")
    out = list(compare.compare(studio, CompareForm(model="tiny", adapters=["faulty-50"], prompt="Ahoy", max_tokens=6,
                                                   seed=1)))[-1]
    assert out[1].startswith("Ahoy") and out[0] != out[1]
    # ...and the run can be resumed from it once the cause is fixed
    train.resume(studio, "faulty", 55)
    assert studio.runs.wait(120)["state"] == "finished"
    assert listing(studio.library)  # and the library still reads


# ---- SIGKILL right after Start ----------------------------------------------------------------

KILL_AFTER_START = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from studio_helpers import _prepare, _start
from studio.app import create_studio
studio = create_studio({lib!r}, {ds!r}, "cpu", "tiny")
_prepare(studio)
_start(studio, "crashed", 400)
assert (studio.library.root / "crashed").is_dir()  # the name is reserved before the first checkpoint
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_studio_killed_right_after_start_leaves_its_run_name_free(tmp_path):
    lib, ds = tmp_path / "lib", tmp_path / "datasets"
    script = KILL_AFTER_START.format(tests=str(ROOT / "tests"), lib=str(lib), ds=str(ds))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (lib / "crashed").is_dir()  # left behind by the crash, holding nothing

    s = create_studio(lib, ds, "cpu", "tiny")  # the next start-up
    assert not (lib / "crashed").exists()
    assert "crashed" not in s.library.names()
    _start(s, "crashed", 2)  # the name is free again: Start does not say it exists
    assert s.runs.wait(120)["state"] == "finished"


# ---- publishing folders ---------------------------------------------------------------------------

def test_a_published_folder_appears_whole_and_a_replaced_one_is_never_missing(tmp_path, monkeypatch):
    from core.atomic import publish_dir
    seen = []

    def build(text):
        def fill(tmp):
            (tmp / "a.txt").write_text(text)
            seen.append((tmp / "../x").resolve().exists() and (tmp_path / "x" / "a.txt").read_text())
        return fill

    publish_dir(tmp_path / "x", build("one"))
    with pytest.raises(FileExistsError, match="already exists"):
        publish_dir(tmp_path / "x", build("two"))
    publish_dir(tmp_path / "x", build("three"), replace=True)
    assert (tmp_path / "x" / "a.txt").read_text() == "three"
    assert seen == [False, "one", "one"]  # while the new one was built, the old one was still whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp or old folder left

    def fail(tmp):
        (tmp / "half").write_text("x")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError, match="No space"):
        publish_dir(tmp_path / "y", fail)
    with pytest.raises(OSError, match="No space"):
        publish_dir(tmp_path / "x", fail, replace=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and (tmp_path / "x" / "a.txt").read_text() == "three"
