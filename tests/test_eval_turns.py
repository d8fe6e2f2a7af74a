"""Evaluation beside decoding (issue 28): scoring runs in chunks of bounded work, one lock hold each, and
between chunks gives way until the decode scheduler has had its share of the time (core.train.evaluate's
DecodeFirst). The chunks change no figure, and an evaluation's figures are the same whether Compares
stream beside it or not."""
from __future__ import annotations

import threading

import pytest

from adapter_helpers import LX, LY, make_adapter
from core.engine import Engine
from core.generate.sampling import SamplingConfig
from core.generate.scheduler import DecodeScheduler
from core.lora.config import LoraConfig
from core.train.evaluate import DecodeFirst, chunk_sizes, evaluate_models, token_differences

TEXT = "Ahoy! Today in the galley we cook <b>fish</b> & chips, no cap.\nArr."
SMALL = 20_000_000  # multiply-adds per chunk: the body of two 64-token rows, the head of 6 tokens (tiny model)


class FakeDecode:
    """A decode scheduler as DecodeFirst sees it: decoding runs (its counter moves) only when waited for."""

    def __init__(self, lock=None):
        self.decode_seconds, self.waits, self.lock = 0.0, [], lock

    def wait_decoded(self, seconds, timeout):
        assert self.lock is None or not self.lock.locked(), "gave way while holding the lock"
        self.waits.append((round(seconds, 9), round(timeout, 9)))
        self.decode_seconds = max(self.decode_seconds, seconds)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_after_each_chunk_decoding_gets_two_thirds_of_the_time_before_the_next():
    lock, clock = threading.Lock(), FakeClock()
    decode = FakeDecode(lock)
    decode.decode_seconds = 5.0  # what decoding did before does not count
    turns = DecodeFirst(lambda: decode, clock=clock)
    with turns.turn(lock):  # nothing owed yet: the first chunk starts at once
        assert lock.locked()
        clock.now += 0.3  # the chunk took 0.3 s
    assert decode.waits == [] and not lock.locked()
    with turns.turn(lock):
        clock.now += 0.1
    # decode runs 2 x 0.3 s (2/3 of the time) first; stalled elsewhere, the evaluation waits 3x that at most
    assert decode.waits == [(5.6, 1.8)]
    with turns.turn(lock):
        pass
    assert decode.waits[-1] == (5.8, 0.6)  # after the 0.1 s chunk: 0.2 s of decoding


def test_the_share_is_a_setting_and_nothing_is_waited_for_without_a_scheduler():
    clock, decode = FakeClock(), FakeDecode()
    turns = DecodeFirst(lambda: decode, share=0.5, clock=clock)
    for _ in range(3):
        with turns.turn():
            clock.now += 0.2
    assert decode.waits == [(0.2, 0.6), (0.4, 0.6)]  # half the time: as long as each chunk
    alone = DecodeFirst(lambda: None, clock=clock)
    for _ in range(3):
        with alone.turn():
            clock.now += 0.2  # nothing to give way to, nothing to wait on


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
    chunked = evaluate_models(tiny_abc, names, sample_ds.train, seq_len=64, work=SMALL)
    assert chunked.tokens == whole.tokens and chunked.forwards == whole.forwards
    for c, w in zip(chunked.scores, whole.scores):
        assert abs(c.loss - w.loss) <= 1e-6 * abs(w.loss), (c.name, c.loss, w.loss)  # fp32 rounding at most
    one = [tuple(d) for d in token_differences(tiny_abc, TEXT, "b")]
    pieces = token_differences(tiny_abc, TEXT, "b", turns=DecodeFirst())
    assert [d.text for d in pieces] == [d[0] for d in one]
    assert max(abs(d.diff - o[3]) for d, o in zip(pieces, one)) < 1e-5


def test_an_evaluation_gives_way_between_chunks(tiny_abc, sample_ds):
    lock = threading.Lock()
    decode = FakeDecode(lock)
    ev = evaluate_models(tiny_abc, [None, "a"], sample_ds.train, seq_len=64, lock=lock, work=SMALL,
                         turns=DecodeFirst(lambda: decode))
    assert len(decode.waits) >= 2 * 16  # between the chunks of every window's two rows
    assert ev.tokens == len(sample_ds.train) - 1


def test_the_scheduler_counts_its_decode_time_and_is_not_waited_for_when_idle(tiny):
    s = DecodeScheduler(tiny, max_rows=2, max_len=64)
    try:
        s.submit([1, 2, 3], [None], SamplingConfig(max_new_tokens=4, temperature=0.0)).result(60)
        assert s.decode_seconds > 0
        waiter = threading.Thread(target=s.wait_decoded, args=(float("inf"), None), daemon=True)
        waiter.start()
        waiter.join(60)
        assert not waiter.is_alive()  # no decode work: nothing to give way to
    finally:
        s.close()


def test_an_evaluation_scores_the_same_while_compares_stream(tmp_path, source, sample_ds):
    engine = Engine("cpu", tmp_path / "lib")
    engine.library.save(source, "x", "x", LX, "tiny")
    engine.library.save(source, "y", "y", LY, "tiny")
    engine.base("tiny")
    try:
        alone = engine.evaluate(sample_ds.train, [None, "x", "y"], seq_len=64)
        waits, streamed, done = [], [], threading.Event()
        sched = engine.scheduler()
        real_wait = sched.wait_decoded
        sched.wait_decoded = lambda *a: (waits.append(a), real_wait(*a))

        def compares():
            cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, seed=1)
            while not done.is_set():
                streamed.append(list(engine.compare("Once upon a time", [None, "y"], cfg, user="u"))[-1])

        t = threading.Thread(target=compares, daemon=True)
        t.start()
        try:
            beside = engine.evaluate(sample_ds.train, [None, "x", "y"], seq_len=64)
        finally:
            done.set()
            t.join(120)
        assert [s.loss for s in beside.scores] == [s.loss for s in alone.scores]
        assert beside.tokens == alone.tokens
        assert streamed and all(texts == streamed[0] for texts in streamed)
        assert waits  # it gave way to the compares
    finally:
        engine.close()
