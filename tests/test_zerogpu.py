"""ZeroGPU (Hugging Face Spaces' shared GPUs) on the CPU: under LORA_STUDIO_ZEROGPU_SIMULATE each GPU call runs in
a fresh process forked from the test, arguments and results pickled, nothing it changes coming back, as on a
ZeroGPU Space. The main process keeps its base on the CPU and never starts CUDA; the answers are those of a
studio without ZeroGPU. Outside ZeroGPU (and its simulation) the wrapper is the function itself."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from adapter_helpers import LX, LY
from core import zerogpu, zerogpu_calls
from core.adapters.validate import AdapterError
from core.engine import Engine
from core.generate.sampling import SamplingConfig

CFG = SamplingConfig(max_new_tokens=12, temperature=0.9, seed=7)
PROMPT = "The quick brown fox"
TOUCHED = []  # module state a GPU call changes: under the simulation it stays in the worker


@pytest.fixture
def simulated(monkeypatch):
    """The simulation on; yields the names of the functions run in GPU calls so far."""
    monkeypatch.delenv(zerogpu.ZERO_GPU_ENV, raising=False)
    monkeypatch.setenv(zerogpu.SIMULATE_ENV, "1")
    called, in_child = [], zerogpu._in_child

    def counted(fn, *rest):
        called.append(fn.__name__)
        return in_child(fn, *rest)
    monkeypatch.setattr(zerogpu, "_in_child", counted)
    yield called


def _engine(tmp_path, source, gpu_calls=None):
    e = Engine("cpu", tmp_path / "lib", dtype=torch.float32, gpu_calls=gpu_calls)
    if not (tmp_path / "lib" / "x").exists():
        e.library.save(source, "x", "x", LX, "tiny")
        e.library.save(source, "y", "y", LY, "tiny")
    e.base("tiny")
    return e


def _last(stream):
    out = None
    for out in stream:
        pass
    return out


def _touch_and_report_pid(item):
    TOUCHED.append(item)
    return os.getpid(), len(TOUCHED)


def test_outside_zerogpu_the_wrapper_is_the_function_itself(monkeypatch):
    monkeypatch.delenv(zerogpu.ZERO_GPU_ENV, raising=False)
    monkeypatch.delenv(zerogpu.SIMULATE_ENV, raising=False)
    assert zerogpu.gpu(_touch_and_report_pid, lambda item: 5) is _touch_and_report_pid
    assert not zerogpu.active() and zerogpu_calls.GpuCalls.here() is None


@pytest.mark.parametrize("value,on", [("true", True), ("True", True), ("1", True), ("t", True),
                                      ("false", False), ("0", False), ("yes", False), ("", False)])
def test_zerogpu_is_detected_as_the_spaces_package_detects_it(monkeypatch, value, on):
    monkeypatch.setenv(zerogpu.ZERO_GPU_ENV, value)
    assert zerogpu.on_zerogpu() is on


def test_durations_grow_with_the_request_and_are_capped():
    assert zerogpu.compare_seconds(1, 64) < zerogpu.compare_seconds(4, 64) < zerogpu.compare_seconds(4, 512)
    assert zerogpu.evaluate_seconds(1, 1000) < zerogpu.evaluate_seconds(5, 100_000)
    assert zerogpu.chunk_seconds(30) == zerogpu.SETUP_S + 30
    assert zerogpu.compare_seconds(5, 10**6) == zerogpu.chunk_seconds(10**6) == zerogpu.MAX_CALL_S


def test_a_simulated_gpu_call_runs_in_a_fresh_process_and_changes_nothing_here(simulated):
    call = zerogpu.gpu(_touch_and_report_pid, lambda item: 5)
    assert call is not _touch_and_report_pid
    first, second = call("a"), call("b")
    assert first[0] != os.getpid() and second[0] != first[0]  # a fresh worker each call
    assert first[1] == second[1] == 1 and TOUCHED == []  # each saw only its own change; none came back
    with pytest.raises(Exception):  # arguments cross by pickle: a lock cannot
        import threading
        call(threading.Lock())


def test_compare_evaluate_and_token_differences_answer_as_without_zerogpu(tmp_path, source, simulated):
    local = _engine(tmp_path, source)
    remote = _engine(tmp_path, source, zerogpu_calls.GpuCalls("fp32", "cpu"))
    assert local.gpu_calls is None and remote.gpu_calls is not None
    columns = [None, "x", "y"]
    assert _last(remote.compare(PROMPT, columns, CFG)) == _last(local.compare(PROMPT, columns, CFG))
    ids = np.random.default_rng(0).integers(0, 50000, 300)
    got, want = remote.evaluate(ids, columns, 32, 256), local.evaluate(ids, columns, 32, 256)
    assert [s.name for s in got.scores] == columns
    assert [s.loss for s in got.scores] == pytest.approx([s.loss for s in want.scores], abs=1e-5)
    assert remote.token_differences(PROMPT, "x") == pytest.approx(local.token_differences(PROMPT, "x"))
    assert simulated == ["_compare", "_evaluate", "_token_differences"]  # each in a GPU call, none here
    assert remote._scheduler is None and not torch.cuda.is_initialized()  # the main process never starts CUDA  # the main process never starts CUDA


def test_an_error_in_the_gpu_call_keeps_its_class_and_message(tmp_path, source, simulated):
    """ZeroGPU replaces the message of an exception a GPU call raises (but gr.Error's): ours come back as values."""
    remote = _engine(tmp_path, source, zerogpu_calls.GpuCalls("fp32", "cpu"))
    failed = zerogpu_calls._token_differences(remote.gpu_calls.site(remote), "word " * 3000, "x")
    assert isinstance(failed, zerogpu_calls.Failed) and failed.cls is ValueError
    with pytest.raises(ValueError, match="Shorten the text"):
        remote.token_differences("word " * 3000, "x")
    (tmp_path / "lib" / "y").rename(tmp_path / "lib" / "gone")  # after the main process checked it
    with pytest.raises(AdapterError, match="no adapter named 'y'"):
        _last(remote.compare(PROMPT, ["y"], CFG))


def test_with_the_spaces_package_outside_zerogpu_its_decorator_changes_nothing(tmp_path, source, monkeypatch):
    """requirements-dev.txt installs `spaces` (what a Space installs): outside ZeroGPU its decorator returns the
    function itself, as ours does, and an engine whose calls it wrapped answers as one without."""
    monkeypatch.delenv(zerogpu.ZERO_GPU_ENV, raising=False)
    monkeypatch.delenv(zerogpu.SIMULATE_ENV, raising=False)
    spaces = pytest.importorskip("spaces")
    assert spaces.GPU(duration=lambda item: 5)(_touch_and_report_pid) is _touch_and_report_pid
    assert spaces.GPU(_touch_and_report_pid) is _touch_and_report_pid
    calls = zerogpu_calls.GpuCalls("fp32", "cpu")  # wrapped here by zerogpu.gpu: the functions themselves
    assert calls._compare is zerogpu_calls._compare and calls._evaluate is zerogpu_calls._evaluate
    wrapped, plain = _engine(tmp_path, source, calls), _engine(tmp_path, source)
    columns = [None, "x"]
    assert _last(wrapped.compare(PROMPT, columns, CFG)) == _last(plain.compare(PROMPT, columns, CFG))


def test_a_studio_on_zerogpu_keeps_its_base_on_the_cpu_and_its_compare_tab_writes_the_same_text(
        tmp_path, source, monkeypatch):
    from studio.app import create_studio
    from studio.tabs.compare import CompareForm, compare

    def final_texts(studio):
        studio.engine.library.save(source, "x", "x", LX, "tiny")
        form = CompareForm(model="tiny", adapters=["x"], prompt=PROMPT, max_tokens=12, seed=7)
        return _last(compare(studio, form))[:2]

    monkeypatch.delenv(zerogpu.ZERO_GPU_ENV, raising=False)
    plain = create_studio(tmp_path / "a", tmp_path / "da", "cpu", "tiny", precision="fp32")
    monkeypatch.setenv(zerogpu.SIMULATE_ENV, "1")
    zero = create_studio(tmp_path / "b", tmp_path / "db", "auto", "tiny", precision="fp32")
    assert plain.engine.gpu_calls is None and zero.engine.gpu_calls is not None
    assert zero.engine.device.type == "cpu"  # --device auto: the GPU is the workers'
    assert final_texts(zero) == final_texts(plain)
    assert zero.engine._scheduler is None  # the text came from a GPU call
    assert zero.engine.model.device.type == "cpu" and not torch.cuda.is_initialized()


# ---- training in chunks, each one GPU call, driven by the page's ticks ------------------------------------

def test_a_run_in_gpu_call_chunks_driven_by_ticks_equals_the_run_at_once_and_pauses_without_ticks(
        tmp_path, sample_ds, simulated):
    from core.lora.config import LoraConfig
    from core.train.loop import train_chunk
    from core.train.trainer import Trainer
    from studio.zerogpu_jobs import ChunkedRuns
    from train_helpers import quick
    from safetensors.torch import load_file
    lcfg, tcfg = LoraConfig(r=4, dropout=0.1), quick(steps=3, eval_interval=2, checkpoint_interval=2)
    engine = Engine("cpu", tmp_path / "lib", dtype=torch.float32, gpu_calls=zerogpu_calls.GpuCalls("fp32", "cpu"))
    engine.base("tiny")
    whole = train_chunk(Trainer(engine.shared_model(), sample_ds, lcfg, tcfg, "whole", tmp_path / "whole"))
    now = [0.0]
    runs = ChunkedRuns(engine, chunk_s=0.0, idle_s=30, clock=lambda: now[0])  # 0 s: one step per chunk
    run = runs.start(zerogpu_calls.ChunkJob(sample_ds, lcfg, tcfg, "cut", str(tmp_path / "cut"), {}), "ann")
    runs.tick(run.id, "ann")
    with pytest.raises(ValueError, match="there is no training run"):
        runs.tick(run.id, "bob")  # another user's page drives nothing
    runs.tick(run.id, "ann")
    now[0] += 31  # the page closed: the next tick finds the run paused and trains nothing
    assert runs.tick(run.id, "ann").status == "paused" and run.chunks == 2
    runs.resume(run.id, "ann")
    while run.status == "running":
        runs.tick(run.id, "ann")
    assert run.status == "finished" and run.chunks == 3 and run.state is None
    assert simulated == ["_train_chunk"] * 3 and not torch.cuda.is_initialized()
    steps = [(e["step"], e["loss"]) for e in run.events if e["type"] == "step"]
    assert steps == pytest.approx([(e["step"], e["loss"]) for e in whole.events if e["type"] == "step"], abs=1e-5)
    a, b = load_file(str(tmp_path / "whole" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "cut" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_the_train_tab_on_zerogpu_trains_in_chunks_its_timer_drives_stop_saves_and_resume_continues(
        tmp_path, simulated):
    """Start, Stop and Resume on the Train tab go through the runner as on any studio; each tick of the tab's
    timer from the owner's page runs the next chunk in a GPU call, folded into the job the card and chart read."""
    import json

    import gradio as gr
    from safetensors.torch import load_file
    from core.adapters.library import RESUMABLE, checkpoint_dirs
    from core.train.loop import train_chunk
    from core.train.trainer import Trainer
    from studio.app import build_ui, create_studio
    from studio.tabs import train
    from studio_helpers import FAST, _form, _prepare, _start
    studio = create_studio(tmp_path / "lib", tmp_path / "datasets", "auto", "tiny", precision="fp32")
    studio.chunked.runs.chunk_s = 0.0  # one optimizer step per chunk
    now = [0.0]
    studio.chunked.runs.clock = lambda: now[0]
    timer_tick = next(fn.fn for fn in build_ui(studio).fns.values() if [t[1] for t in fn.targets] == ["tick"])
    alice, bob = gr.Request(username="alice"), gr.Request(username="bob")

    def tick(request):
        return timer_tick(None, "", "", "", request)[0]  # the job card it draws

    _prepare(studio)
    assert "Started **cut**" in _start(studio, "cut", 3, user="alice")[0]
    assert studio.runs.snapshot()["state"] == "starting" and simulated == []  # no GPU call before a tick
    tick(bob)  # another user's page drives nothing
    assert simulated == []
    tick(alice)
    now[0] += 31  # the page closed: any page's next tick finds the run paused, and its base free meanwhile
    assert "Paused" in tick(bob) and studio.runs.snapshot()["state"] == "paused"
    assert studio.runs.scheduler.running_base() is None
    assert "Paused" in tick(alice) and simulated == ["_train_chunk"]  # the owner's page trains nothing till Resume
    assert "Resumed **cut** at step 1" in train.resume(studio, "", None, user="alice")[0]
    while studio.runs.snapshot()["state"] != "finished":
        tick(alice)
    snap = studio.runs.snapshot()
    assert simulated == ["_train_chunk"] * 3 and not torch.cuda.is_initialized()
    assert [p["step"] for p in snap["points"]] == [1, 2, 3] and [e["step"] for e in snap["evals"]] == [0, 3]
    history = [json.loads(line) for line in (studio.library.root / "cut" / "history.jsonl").read_text().splitlines()]
    assert snap["progress"]["elapsed"] == pytest.approx(history[-1]["elapsed"])  # the run's seconds, not a chunk's
    entry = next(e for e in studio.library.list() if e.name == "cut")
    assert entry.has_final and entry.steps == 3 and entry.user == "alice" and entry.dataset == "pirates"
    lcfg, tcfg = train.make_configs(_form(model="tiny", dataset="pirates", steps=3, **FAST))
    whole = train_chunk(Trainer(studio.engine.shared_model(), studio.dataset("pirates"), lcfg, tcfg, "whole",
                                tmp_path / "whole"))
    assert [e["loss"] for e in whole.events if e["type"] == "step"] == pytest.approx(
        [p["loss"] for p in snap["points"]], abs=1e-5)
    a, b = (load_file(str(p / "adapter_model.safetensors")) for p in (tmp_path / "whole", studio.library.root / "cut"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Stop between two ticks ends the run at once, saved with its resume point; Resume goes on from there
    _start(studio, "halt", 5, user="alice")
    tick(alice)
    tick(alice)
    assert "Stopped 'halt' at step 2" in train.stop(studio, user="alice")
    assert studio.runs.snapshot()["state"] == "stopped" and simulated == ["_train_chunk"] * 6
    entry = next(e for e in studio.library.list() if e.name == "halt")
    assert entry.has_final and entry.steps == 2 and entry.status == "stopped"
    assert checkpoint_dirs(studio.library.root / "halt", RESUMABLE)
    assert "from step 2" in train.resume(studio, "halt", None, user="alice")[0]
    while studio.runs.snapshot()["state"] != "finished":
        tick(alice)
    assert next(e for e in studio.library.list() if e.name == "halt").steps == 5
    from studio.tabs.compare import CompareForm, compare  # the trained adapters, as any studio's, on Compare
    texts = _last(compare(studio, CompareForm(model="tiny", adapters=["cut", "halt"], prompt=PROMPT, max_tokens=4)))
    assert all(t.startswith(PROMPT) for t in texts[:3]) and simulated[-1] == "_compare"
    assert not torch.cuda.is_initialized()
