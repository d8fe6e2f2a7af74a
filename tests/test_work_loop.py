"""One work loop per loaded base (issue 28): decode steps, evaluation chunks, training micro-steps and adapter
changes all run on the base's one loop thread, taking turns by core.generate.side_work's policy. Work beside
other users' work gives the same figures as alone: the turns move work in time, never change it."""
from __future__ import annotations

import threading

import pytest

from adapter_helpers import make_adapter
from core.engine import Engine
from core.generate.sampling import SamplingConfig
from core.generate.side_work import SideWork, Unit
from core.lora.config import LoraConfig
from core.train import loop as train_loop
from core.train.evaluate import chunk_sizes, evaluate_models, token_differences
from core.train.jobs import JobSpec, TrainScheduler
from test_scheduler import Freeze
from test_train_jobs import A, B, _until, alone

TEXT = "Ahoy! Today in the galley we cook <b>fish</b> & chips, no cap.\nArr."
SMALL = 20_000_000  # multiply-adds per chunk: the body of two 64-token rows, the head of 6 tokens (tiny model)
LOOP = "decode-scheduler"  # the work loop's threads' names start so (its second lane: "decode-scheduler-side")


def unit(owner, urgent=False):
    return Unit(lambda: owner, owner, urgent)


# ---- the policy ---------------------------------------------------------------------------------------

def test_while_requests_decode_side_work_waits_for_decodings_two_thirds_of_the_time():
    side = SideWork()
    first, second = unit("eve"), unit("eve")
    side.put(first)
    side.put(second)
    assert side.take(decoding=True) is first  # nothing owed yet: at once
    side.ran(first, 0.25)
    assert side.take(decoding=True) is None  # decoding is owed 2 x 0.25 s first
    side.decoded(0.375)
    assert side.take(decoding=True) is None
    side.decoded(0.125)
    assert side.take(decoding=True) is second


def test_with_nothing_to_decode_side_work_runs_back_to_back_and_the_share_is_a_setting():
    side = SideWork(share=0.5)
    a, b = unit("eve"), unit("eve")
    side.put(a)
    side.put(b)
    side.ran(side.take(decoding=False), 10.0)
    assert side.take(decoding=False) is b
    half = SideWork(share=0.5)
    half.ran(unit("x"), 0.25)
    half.put(c := unit("x"))
    half.decoded(0.125)
    assert half.take(decoding=True) is None
    half.decoded(0.125)  # as long as the unit took: half the time
    assert half.take(decoding=True) is c
    with pytest.raises(ValueError, match="between 0 and 1"):
        SideWork(share=1.0)


def test_owners_take_turns_and_structure_changes_are_taken_apart_first():
    side = SideWork()
    eve1, eve2, bob, change = unit("eve"), unit("eve"), unit("bob"), unit("engine", urgent=True)
    for u in (eve1, eve2, bob, change):
        side.put(u)
    assert side.take(decoding=False) is eve1 and side.waiting(urgent_only=True)
    assert side.take_urgent() is change and not side.waiting(urgent_only=True)
    assert side.take(decoding=False) is bob  # eve queued first, but bob's turn comes before her second unit
    side.put(bob2 := unit("bob"))
    side.put(eve3 := unit("eve"))
    assert side.take(decoding=False) is eve2  # she was served longer ago than bob
    assert side.take(decoding=False) is bob2 and side.take(decoding=False) is eve3


# ---- chunks change no figure --------------------------------------------------------------------------

def test_chunks_are_bounded_by_the_work_budget():
    from core.model.config import PRESETS
    cfg = PRESETS["tiny"]
    body_token = 2 * (12 * 64 * 64 + 2 * 64 * 64)  # multiply-adds of one token through the 2 layers at T = 64
    assert chunk_sizes(cfg, 64, SMALL) == (SMALL // (64 * body_token), SMALL // (64 * 50257)) == (2, 6)
    rows, piece = chunk_sizes(cfg, 1024)
    assert rows == 1 and 64 <= piece <= 256  # one 1,024-token row's body (at least one); the head of ~120 tokens
    assert chunk_sizes(cfg, 64, 10**15, budget=2 * 64 * 50257 * 4)[1] == 128  # the logits budget caps a piece


@pytest.fixture
def tiny_abc(tiny_ab):
    make_adapter(tiny_ab, "c", LoraConfig(r=2, alpha=4.0, targets=("attn.c_proj",)), seed=3, std=0.3)
    return tiny_ab


def test_chunked_scoring_equals_one_forward(tiny_abc, sample_ds):
    names = [None, "a", "b", "c"]
    whole = evaluate_models(tiny_abc, names, sample_ds.train, seq_len=64, work=10**15)
    runs = []
    chunked = evaluate_models(tiny_abc, names, sample_ds.train, seq_len=64, work=SMALL,
                              run=lambda fn: runs.append(1) or fn())
    assert len(runs) >= 2 * 16  # every window's rows in several chunks, each run where it was told
    assert chunked.tokens == whole.tokens and chunked.forwards == whole.forwards
    for c, w in zip(chunked.scores, whole.scores):
        assert abs(c.loss - w.loss) <= 1e-6 * abs(w.loss), (c.name, c.loss, w.loss)  # fp32 rounding at most
    one = [tuple(d) for d in token_differences(tiny_abc, TEXT, "b")]
    pieces = token_differences(tiny_abc, TEXT, "b", run=lambda fn: fn())
    assert [d.text for d in pieces] == [d[0] for d in one]
    assert max(abs(d.diff - o[3]) for d, o in zip(pieces, one)) < 1e-5


# ---- beside other users' work, through the engine -------------------------------------------------------

@pytest.fixture(params=[1, 2], ids=["one lane (a GPU's)", "two lanes (a CPU's)"])
def engine(engine_xy, request):
    engine_xy.lanes = request.param
    engine_xy.close()  # the next request makes the loop anew, with these lanes
    return engine_xy


class Compares:
    """A user streaming the same greedy Compare over and over on its own thread, until stopped."""

    def __init__(self, engine: Engine, adapters=(None, "y")):
        self.texts, self.done = [], threading.Event()
        cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, seed=1)

        def go():
            while not self.done.is_set():
                self.texts.append(list(engine.compare("Once upon a time", list(adapters), cfg, user="carol"))[-1])
        self.thread = threading.Thread(target=go, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(120)


def _log_work(engine, monkeypatch):
    """What ran on the work loop, in order: 'step' for each decode step, the owner's name for side work."""
    sched, log = engine.scheduler(), []
    step = sched._step
    monkeypatch.setattr(sched, "_step", lambda: (log.append("step") if sched._rows else None, step())[1])
    on_loop = engine.on_loop
    monkeypatch.setattr(engine, "on_loop", lambda model, fn, owner=None, urgent=False: on_loop(
        model, lambda: (log.append((owner, threading.current_thread().name)), fn())[1], owner, urgent))
    return log


def test_an_evaluation_scores_the_same_while_compares_stream_and_takes_turns_with_them(engine, sample_ds,
                                                                                       monkeypatch):
    alone_ev = engine.evaluate(sample_ds.train, [None, "x", "y"], seq_len=64)
    assert len({s.loss for s in alone_ev.scores}) == 3  # the adapters change the figures
    log = _log_work(engine, monkeypatch)
    with Compares(engine) as compares:
        while not compares.texts:  # a compare has streamed to its end: the next ones overlap the evaluation
            threading.Event().wait(0.01)
        beside = engine.evaluate(sample_ds.train, [None, "x", "y"], seq_len=64, user="eve")
    assert [s.loss for s in beside.scores] == [s.loss for s in alone_ev.scores]
    assert beside.tokens == alone_ev.tokens
    assert len(compares.texts) > 1 and all(t == compares.texts[0] for t in compares.texts)
    chunks = [i for i, e in enumerate(log) if e != "step"]
    assert {o for o, _ in (log[i] for i in chunks)} == {"eve"}  # as eve's turns
    assert all(t.startswith(LOOP) for _, t in (log[i] for i in chunks))  # on the loop's threads
    assert any(e == "step" for e in log[chunks[0]:chunks[-1]])  # decode steps ran between its chunks


def test_co_batched_training_equals_solo_while_compares_and_evaluations_run(engine, sample_ds, tmp_path,
                                                                            monkeypatch):
    threads = []
    fb = train_loop.forward_backward
    monkeypatch.setattr(train_loop, "forward_backward",
                        lambda *a: (threads.append(threading.current_thread().name), fb(*a))[1])
    solo = {name: alone(sample_ds, tmp_path, name, job) for name, job in (("a", A), ("b", B))}
    assert solo["a"][0] != solo["b"][0]  # two different jobs
    threads.clear()
    sched = TrainScheduler.for_engine(engine, capacity_tokens=10_000)
    scores = []
    try:
        with Compares(engine, (None, "x")) as compares:
            jobs = [sched.submit(JobSpec(n, "tiny", sample_ds, *job, tmp_path / "co" / n, user=n,
                                         adapter=f"train:{n}")) for n, job in (("a", A), ("b", B))]
            while any(j.live for j in jobs):
                scores.append(engine.evaluate(sample_ds.train, [None, "y"], seq_len=64, max_tokens=512, user="eve"))
            assert all(j.wait(120) for j in jobs)
    finally:
        sched.close()
    assert compares.texts and all(t == compares.texts[0] for t in compares.texts)
    assert scores and all([s.loss for s in e.scores] == [s.loss for s in scores[0].scores] for e in scores)
    assert threads and all(t.startswith(LOOP) for t in threads)  # every shared micro-step ran on the work loop
    for job, name in zip(jobs, ("a", "b")):
        snap = job.snapshot()
        assert snap["state"] == "finished", snap
        assert [p["loss"] for p in snap["points"]] == pytest.approx(solo[name][0], abs=1e-5)


# ---- error paths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("lanes", [1, 2])
def test_a_failing_unit_raises_in_its_caller_and_the_loop_goes_on(tiny, lanes):
    from core.generate.scheduler import DecodeScheduler
    s = DecodeScheduler(tiny, max_rows=2, max_len=32, lanes=lanes)
    try:
        with pytest.raises(ZeroDivisionError):
            s.run(lambda: 1 / 0, owner="eve")
        with pytest.raises(ZeroDivisionError):
            s.run(lambda: 1 / 0, urgent=True)
        assert s.run(lambda: "still here", owner="eve") == "still here"
        greedy = SamplingConfig(max_new_tokens=4, temperature=0.0)
        assert len(s.submit([1, 2, 3], [None], greedy).result(60)[0]) == 4
    finally:
        s.close()


@pytest.mark.parametrize("lanes", [1, 2])
def test_closing_the_loop_ends_the_work_still_waiting_with_one_error(tiny, lanes):
    from core.generate.scheduler import DecodeScheduler, SchedulerClosed
    s = DecodeScheduler(tiny, max_rows=2, max_len=32, lanes=lanes)
    got = []

    def waiting():
        try:
            s.run(lambda: "ran", owner="eve")
        except SchedulerClosed as e:
            got.append(e)
    waiter = threading.Thread(target=waiting, daemon=True)
    with Freeze(s):  # the loop is busy with a change: the next unit waits
        waiter.start()
        _until(lambda: len(s._side) == 1)
        s.close(timeout=0)  # closed while the change still runs
    s.close()
    waiter.join(60)
    assert len(got) == 1 and "closed" in str(got[0])
    with pytest.raises(SchedulerClosed):
        s.run(lambda: None)
