"""Compare through the decode scheduler (issue 13, step 2): the Engine and the Compare tab.

Concurrent compares each get exactly the text they get alone (and the text `generate_text` gives: the
same engine without a server); a closed stream frees its rows; a full queue and the rows-per-user cap reach
the user as one message; the scheduler is the one decode path (no --generation loop).
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from adapter_helpers import LX, LY
from core.adapters.validate import AdapterError
from core.engine import BaseInUse, Engine
from core.generate.sampling import SamplingConfig, generate_text
from core.generate.scheduler import DecodeScheduler, SchedulerBusy
from core.lora.layers import add_adapter, remove_adapter
from core.model import tokenizer
from studio.context import friendly
from studio.tabs import compare
from studio.tabs.compare import CompareForm

GREEDY = dict(temperature=0.0, top_k=50, top_p=1.0)
SAMPLED = dict(temperature=0.9, top_k=40, top_p=1.0)
# (prompt, adapters, seed): different prompt lengths, adapter sets and seeds
JOBS = [("The quick brown fox", [None, "x", "y"], 1),
        ("Ahoy", ["y"], 2),
        ("Once upon a time in a galley far away, the cook said", ["x", None], 3),
        ("no cap", [None], 4)]


def _engine(lib) -> Engine:
    e = Engine("cpu", lib)
    e.base("tiny")
    return e


@pytest.fixture
def engines(tmp_path, source):
    """Two engines over one library holding adapters x and y."""
    lib = tmp_path / "lib"
    batched = _engine(lib)
    batched.library.save(source, "x", "x", LX, "tiny")
    batched.library.save(source, "y", "y", LY, "tiny")
    return batched, _engine(lib)


@pytest.fixture
def studio_xy(studio, source):
    studio.engine.library.save(source, "x", "x", LX, "tiny")
    studio.engine.library.save(source, "y", "y", LY, "tiny")
    studio.base("tiny")
    return studio


def _last(it):
    out = None
    for out in it:
        pass
    return out


def _cfg(sampling, seed, n=24):
    return SamplingConfig(max_new_tokens=n, seed=seed, stop_at_eot=False, **sampling)


def _live_rows(sched: DecodeScheduler) -> int:
    with sched._cond:
        return len(sched._rows) + sum(r.rows for r in sched._queue) + sum(r.rows for r in sched._joining)


def _wait(cond, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def _widest_batch(sched: DecodeScheduler) -> list[int]:
    """Record the rows of every decode step (proof that requests shared steps)."""
    widths, forward = [], sched._forward

    def spy(rows):
        widths.append(len(rows))
        return forward(rows)
    sched._forward = spy
    return widths


def _concurrently(fn, jobs, rounds=2):
    got, errors = [], []

    def worker(job):
        try:
            for _ in range(rounds):
                got.append((job, fn(*job)))
        except Exception as e:  # noqa: BLE001 -- surfaced below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(j,)) for j in jobs]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors, errors
    assert len(got) == rounds * len(jobs)
    return got


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled-top-k"])
def test_concurrent_compares_through_the_engine_equal_each_alone(engines, sampling):
    batched, other = engines

    def run(eng, prompt, adapters, seed):
        return _last(eng.compare(prompt, adapters, _cfg(sampling, seed), user=f"u{seed}"))

    def offline(prompt, adapters, seed):  # the trainer's samples: the same engine on the caller's thread
        names = [other.load(a) if a else None for a in adapters]
        return generate_text(other.model, prompt, names, _cfg(sampling, seed))

    alone = {j[2]: run(batched, *j) for j in JOBS}
    assert alone == {j[2]: offline(*j) for j in JOBS}
    widths = _widest_batch(batched.scheduler())
    for (prompt, adapters, seed), texts in _concurrently(lambda *j: run(batched, *j), JOBS):
        assert texts == alone[seed], (prompt, adapters, seed)
    assert max(widths) > 3  # rows of different requests decoded in one step
    assert _live_rows(batched.scheduler()) == 0 and not batched._refs  # rows freed, adapters unpinned


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled-top-k"])
def test_concurrent_compares_through_the_tab_equal_each_alone(studio_xy, sampling):
    studio = studio_xy

    def run(prompt, adapters, seed):
        form = CompareForm(model="tiny", include_base=None in adapters, adapters=[a for a in adapters if a],
                           prompt=prompt, max_tokens=20, seed=seed, **sampling)
        return _last(compare.compare(studio, form, user=f"session:{seed}"))

    jobs = [(p, [None] + [a for a in adapters if a], s) for p, adapters, s in JOBS]  # the base column comes first
    alone = {j[2]: run(*j) for j in jobs}
    widths = _widest_batch(studio.engine.scheduler())
    for job, texts in _concurrently(run, jobs):
        assert texts == alone[job[2]], job
    assert max(widths) > 3
    assert _live_rows(studio.engine.scheduler()) == 0


def test_a_closed_stream_frees_its_rows(engines):
    eng, _ = engines
    sched = eng.scheduler()
    stream = eng.compare("The quick brown fox", [None, "x", "y"], _cfg(GREEDY, 1, n=500))
    next(stream)
    next(stream)
    assert _live_rows(sched) == 3 and eng._refs  # running, its adapters pinned
    stream.close()  # the caller stopped reading (Stop, a closed page)
    assert _wait(lambda: _live_rows(sched) == 0)
    assert not eng._refs
    # the loop goes on serving
    assert _last(eng.compare("Ahoy", ["x"], _cfg(GREEDY, 1, n=4)))[0]


def test_a_stopped_compare_in_the_tab_frees_its_rows(studio_xy):
    studio = studio_xy
    gen = compare.compare(studio, CompareForm(model="tiny", adapters=["x", "y"], prompt="Ahoy", max_tokens=500,
                                              temperature=0, seed=1), user="session:a")
    next(gen)  # the labels
    sched = studio.engine.scheduler()
    next(gen)  # the first texts
    assert _live_rows(sched) == 3
    gen.close()  # what Gradio does on Stop or a closed page
    assert _wait(lambda: _live_rows(sched) == 0)
    assert not studio.engine._refs


def _busy_form(**kw):
    return CompareForm(model="tiny", prompt="Hello", max_tokens=4, seed=1, **kw)


def test_a_full_queue_gives_the_busy_message_through_the_tab(studio_xy):
    studio = studio_xy
    sched = studio.engine.scheduler()
    sched.max_queue = 1
    ids = tokenizer.encode("Hello")
    with studio.engine.lock:  # the loop waits at its next step: what was submitted stays
        first = sched.submit(ids, [None], SamplingConfig(max_new_tokens=4))
        assert _wait(lambda: first.position() == 0)  # admitted; its prefill waits for the lock
        second = sched.submit(ids, [None], SamplingConfig(max_new_tokens=4))
        assert second.position() == 1
        with pytest.raises(SchedulerBusy, match="busy, try again"):
            _last(compare.compare(studio, _busy_form(), user="session:b"))
        with pytest.warns(UserWarning, match=r"busy, try again in a moment \(1 request is waiting\)"):  # one toast, not an error page
            _last(friendly(compare.compare)(studio, _busy_form(), None, "session:b"))
    assert first.result(60) and second.result(60)  # the others are untouched
    assert _live_rows(sched) == 0


def test_the_rows_per_user_cap_through_the_tab(studio_xy):
    studio = studio_xy
    sched = studio.engine.scheduler()
    with studio.engine.lock:
        mine = sched.submit(tokenizer.encode("Hello"), [None] * 8, SamplingConfig(max_new_tokens=4), user="session:c")
        with pytest.warns(UserWarning, match=r"limit is 8 rows per user"):
            _last(friendly(compare.compare)(studio, _busy_form(), None, "session:c"))
        # another user is not limited by it
        other = compare.compare(studio, _busy_form(), user="session:d")
        next(other)
    assert _last(other)[0].startswith("Hello")
    assert mine.result(60)
    assert _wait(lambda: _live_rows(sched) == 0)


def test_the_trainer_changing_adapters_cannot_race_a_step(engines):
    """The trainer adds and removes its adapter under engine.lock; the loop holds that lock around each
    step, so a running compare's text is unchanged."""
    eng, _ = engines
    cfg = _cfg(GREEDY, 1, n=120)
    want = _last(eng.compare("The quick brown fox", [None, "x"], cfg))
    model, stop, changes = eng.shared_model(), threading.Event(), [0]

    def trainer():
        while not stop.is_set():
            with eng.lock:
                add_adapter(model, "train:run", LY)
                remove_adapter(model, "train:run")
            changes[0] += 1
            time.sleep(0.001)
    t = threading.Thread(target=trainer)
    t.start()
    try:
        got = _last(eng.compare("The quick brown fox", [None, "x"], cfg))
    finally:
        stop.set()
        t.join(30)
    assert got == want and changes[0] > 0


def test_the_scheduler_is_the_one_decode_path_on_every_device():
    """No --generation flag and no batched_generation switch: the decode scheduler serves every device
    (CUDA replays a graph per batch bucket inside it)."""
    from app import build_parser
    from studio.app import create_studio
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--generation", "loop"])
    args = build_parser().parse_args(["--max-rows-per-user", "3"])
    assert args.max_rows_per_user == 3 and not hasattr(args, "generation")
    with pytest.raises(ValueError, match="--max-rows-per-user"):
        create_studio(max_rows_per_user=0)
    for device in ("cpu", torch.device("cuda"), torch.device("mps")):
        assert not hasattr(Engine(device), "batched_generation")


def test_torch_threads_flag_sets_the_threads_of_the_whole_process(tmp_path):
    """--torch-threads: a decode loop and a training run each use torch's threads; on 2 cores 2 + 2 oversubscribe."""
    from app import build_parser
    from studio.app import create_studio
    assert build_parser().parse_args([]).torch_threads is None  # torch's choice, one per core
    assert build_parser().parse_args(["--torch-threads", "1"]).torch_threads == 1
    with pytest.raises(ValueError, match="--torch-threads"):
        create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny", torch_threads=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny", torch_threads=1)
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == 1 and seen == [1]  # threads started later (decode loop, training) too
    finally:
        torch.set_num_threads(before)


def test_a_new_base_replaces_the_scheduler_once_no_compare_runs_on_the_old(engines, tmp_path):
    """Another base is refused while a compare runs on the loaded one (it would end that compare: see
    test_adapter_lifetime.py); after it, the new base gets its own loop and the old loop stops."""
    eng, _ = engines
    folder = eng.export_merged("x", tmp_path / "merged")  # another base: tiny with x merged in
    old = eng.scheduler()
    running = eng.compare("The quick brown fox", [None, "y"], _cfg(GREEDY, 1, n=500))
    next(running)
    with pytest.raises(BaseInUse, match="generating or evaluating for other requests"):
        eng.base(str(folder))
    assert _last(running)[1] and old._thread.is_alive()
    eng.base(str(folder))
    assert _wait(lambda: not old._thread.is_alive())
    assert eng.scheduler() is not old and eng.scheduler().model is eng.shared_model()
    assert _last(eng.compare("Ahoy", [None], _cfg(GREEDY, 1, n=4)))[0]


# ---- coalesced updates, the queue position, the token limit (issue 13, last step) ------------------------

def _in_thread(fn, timeout=120):
    """fn() in a thread; its result (fails if it is still running after `timeout` s: a stream never woke)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive() and out, "the stream never ended"
    return out[0]


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "loop"])
def test_a_paced_stream_skips_to_the_latest_texts_and_ends_with_the_final_ones_at_once(engines, batched):
    eng = engines[0 if batched else 1]
    cfg = _cfg(SAMPLED, 5, n=40)
    every_token = list(eng.compare("The quick brown fox", [None, "x"], cfg))
    assert len(every_token) > 10  # unpaced: an update per token (per step the reader sees)
    # an hour between updates: the first texts, then the final ones as soon as the request ends (not in an hour)
    paced = _in_thread(lambda: list(eng.compare("The quick brown fox", [None, "x"], cfg, every=3600)))
    assert 1 <= len(paced) <= 2 and paced[-1] == every_token[-1]
    asked = []
    _in_thread(lambda: list(eng.compare("Ahoy", ["y"], cfg, every=lambda: asked.append(1) or 0.01)))
    assert asked  # a function is asked again before each wait (the studio's interval follows its load)


def test_all_streams_together_stay_within_the_update_budget():
    for streams in range(1, 500):
        interval = compare.update_interval(streams)
        assert interval >= compare.STREAM_INTERVAL  # no stream updates more often than every 80 ms
        assert streams / interval <= compare.UPDATES_PER_S * (1 + 1e-9)  # all together: 50 updates/s at most
    assert compare.update_interval(1) == compare.STREAM_INTERVAL
    assert compare.update_interval(30) == pytest.approx(30 / compare.UPDATES_PER_S)  # 0.6 s with a classroom


def test_the_tab_counts_its_streams_and_spaces_their_updates_by_that_count(studio_xy, monkeypatch):
    studio, asked = studio_xy, []
    engine_compare = studio.engine.compare

    def spy(*a, every=None, **kw):  # what each stream's interval is when the engine asks for it
        return engine_compare(*a, every=lambda: asked.append(every()) or every(), **kw)
    monkeypatch.setattr(studio.engine, "compare", spy)

    def form(seed):
        return CompareForm(model="tiny", adapters=["x"], prompt="Ahoy", max_tokens=400, temperature=0, seed=seed)
    assert int(studio.streams) == 0
    first = compare.compare(studio, form(1), user="session:f")
    next(first), next(first)
    assert int(studio.streams) == 1
    second = compare.compare(studio, form(2), user="session:g")
    next(second), next(second)
    assert int(studio.streams) == 2
    asked.clear()
    next(first)
    assert asked and set(asked) == {compare.update_interval(2)}
    second.close()  # Stop: the count goes down at once
    assert int(studio.streams) == 1
    asked.clear()
    next(first)
    assert set(asked) == {compare.update_interval(1)}
    first.close()
    assert int(studio.streams) == 0
    with pytest.raises(ValueError):  # a refused request is never counted
        next(compare.compare(studio, CompareForm(model="tiny", adapters=["nope"], prompt="Ahoy", max_tokens=4)))
    assert int(studio.streams) == 0


def test_only_the_first_update_changes_the_columns_the_rest_are_plain_texts(studio_xy):
    """Gradio rebuilds a component for every gr.update() or gr.skip() it gets (~1 ms of its event loop each), so
    the streamed updates after the first are plain values; the hidden columns get the "" they hold."""
    form = CompareForm(model="tiny", include_base=False, adapters=["x"], prompt="Ahoy", max_tokens=30, temperature=0,
                       seed=3)
    first, *rest = list(compare.compare(studio_xy, form, user="session:k"))
    assert [u["visible"] for u in first[:5]] == [True, False, False, False, False]
    assert rest and all(type(v) is str for out in rest for v in out)
    assert all(out[1:5] == [""] * 4 for out in rest)


def test_a_compare_brings_the_model_status_itself_with_no_second_event(studio):
    """The status under the model picker says when the base is loaded. It comes with the compare's own
    updates, as its last output: a .then() for it was a second queued event per compare, which cost a third
    of the answers per second with 30 clients."""
    from studio.app import build_ui
    assert "loaded" not in studio.model_status("tiny")  # a fresh studio: the first compare loads the base
    form = CompareForm(model="tiny", prompt="Ahoy", max_tokens=3, temperature=0, seed=3)
    first, *rest = list(compare.compare(studio, form, user="session:s"))
    assert all(out[5] == studio.model_status("tiny") for out in [first, *rest])
    assert "**loaded**" in rest[-1][5]
    demo = build_ui(studio)
    deps = demo.get_config_file()["dependencies"]
    event = next(d for d in deps if d.get("api_name") == "compare")
    status_id = demo.parts["compare"]["model_status"]._id
    assert event["outputs"][-1] == status_id
    assert not [d for d in deps if d.get("trigger_after") == event["id"]]


def test_a_compare_waiting_for_free_rows_shows_its_place_in_the_queue(studio_xy):
    studio = studio_xy
    sched = studio.engine.scheduler()
    ids, four = tokenizer.encode("Hello"), SamplingConfig(max_new_tokens=4)
    prompt = "Once upon a time"
    form = CompareForm(model="tiny", adapters=["x"], prompt=prompt, max_tokens=6, temperature=0, seed=3)
    alone = _last(compare.compare(studio, form, user="session:h"))
    go = threading.Event()  # the loop stops at its next decode step: whoever was admitted holds its slots
    sched._step = lambda decode=sched._step: go.wait(120) and decode()
    try:
        fillers = [sched.submit(ids, [None] * sched.max_rows_per_user, four, user=f"filler{i}")
                   for i in range(-(-sched.max_rows // sched.max_rows_per_user))]
        assert _wait(lambda: all(f.position() == 0 for f in fillers))  # admitted: every slot is taken
        ahead = sched.submit(ids, [None], four, user="ahead")
        assert ahead.position() == 1
        gen = compare.compare(studio, form, user="session:h")
        next(gen)  # the labels
        # (in a thread: a stream that only waits for tokens would block here while the loop is stopped)
        assert _in_thread(lambda: next(gen), 60)[:2] == [f"{prompt}\n\nwaiting in the queue: position 2"] * 2
        ahead.cancel()  # the request ahead leaves: this one moves up, and the page is told
        assert _in_thread(lambda: next(gen), 60)[:2] == [f"{prompt}\n\nwaiting in the queue: position 1"] * 2
    finally:
        go.set()
        del sched._step
    # the slots free up: it runs, and its text is what it is alone
    assert _last(gen) == alone
    assert all(f.result(60) for f in fillers)
    assert _wait(lambda: _live_rows(sched) == 0)


def test_new_tokens_per_request_are_capped_by_the_server(tmp_path, source):
    from app import build_parser
    from studio.app import create_studio
    assert build_parser().parse_args([]).max_new_tokens == 512  # the Compare slider's end
    assert build_parser().parse_args(["--max-new-tokens", "64"]).max_new_tokens == 64
    with pytest.raises(ValueError, match="--max-new-tokens"):
        create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "tiny", max_new_tokens=0)
    for run in ("first", "second"):
        studio = create_studio(tmp_path / run, tmp_path / "ds", "cpu", "tiny", max_new_tokens=16)
        studio.engine.library.save(source, "x", "x", LX, "tiny")
        studio.base("tiny")
        too_many = CompareForm(model="tiny", adapters=["x"], prompt="Ahoy", max_tokens=17, seed=1)
        with pytest.raises(ValueError, match=r"17 new tokens is more than this server allows per request \(16"):
            next(compare.compare(studio, too_many, user="session:j"))
        with pytest.warns(UserWarning, match=r"more than this server allows per request \(16, its --max-new-tokens\)"):
            _last(friendly(compare.compare)(studio, too_many, None, "session:j"))
        assert studio.engine._scheduler is None or _live_rows(studio.engine._scheduler) == 0  # nothing was queued
        assert int(studio.streams) == 0 and not studio.engine._refs
        at_the_cap = CompareForm(model="tiny", adapters=["x"], prompt="Ahoy", max_tokens=16, temperature=0, seed=1)
        at_the_cap = _last(compare.compare(studio, at_the_cap, user="session:j"))
        assert len(tokenizer.encode(at_the_cap[0])) > len(tokenizer.encode("Ahoy"))
        studio.engine.close()
    with pytest.raises(ValueError, match="max new tokens"):
        Engine("cpu", max_new_tokens=0)


def test_close_stops_the_loop_thread_and_a_later_compare_gets_a_new_one(engines):
    eng, _ = engines
    want = _last(eng.compare("Ahoy", [None, "x"], _cfg(SAMPLED, 2, n=8)))
    old = eng.scheduler()
    running = eng.compare("The quick brown fox", [None], _cfg(GREEDY, 1, n=500))
    next(running)
    eng.close()
    assert not old._thread.is_alive()  # joined: nothing of it runs when the process goes on to exit
    with pytest.raises(AdapterError, match="generate again"):  # a request still running ends with a message
        _last(running)
    assert _last(eng.compare("Ahoy", [None, "x"], _cfg(SAMPLED, 2, n=8))) == want
    assert eng.scheduler() is not old
    eng.close()
    eng.close()  # twice is harmless
