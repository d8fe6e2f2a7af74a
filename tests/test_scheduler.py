"""The decode scheduler: many requests in one decode loop, each getting exactly what it gets alone.

`Freeze` (a unit of side work that waits: the loop runs nothing else meanwhile) holds the loop at a step
boundary, so "while A is mid-decode" is a fact, not a race.
"""
import random
import threading

import pytest
import torch

from core.adapters.validate import AdapterError
from core.generate.sampling import SamplingConfig, generate
from core.generate.scheduler import DecodeScheduler, SchedulerBusy, SchedulerClosed, pool_rows
from core.model import tokenizer

PROMPT = tokenizer.encode("The quick brown fox")
LONG = SamplingConfig(max_new_tokens=100, temperature=0.8, seed=9, stop_at_eot=False)


@pytest.fixture
def model(tiny_ab):
    return tiny_ab


class Freeze:
    """`with Freeze(s):` holds scheduler s's loop at an iteration boundary (an urgent unit of side work that
    waits until the block ends); requests submitted meanwhile all join at the next iteration."""

    def __init__(self, s: DecodeScheduler):
        self.s = s

    def __enter__(self):
        entered, self.release = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.s.run, args=(lambda: entered.set() or self.release.wait(),),
                                       kwargs={"urgent": True}, daemon=True)
        self.thread.start()
        assert entered.wait(60)

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(60)


@pytest.fixture
def scheduler(model):
    """scheduler(**limits) -> a DecodeScheduler on the model (closed after the test) and its Freeze."""
    made = []

    def make(**kw):
        made.append(DecodeScheduler(model, max_len=128, **kw))
        return made[-1], Freeze(made[-1])

    yield make
    for s in made:
        s.close()


def alone(model, prompt, adapters, cfg):
    return generate(model, [prompt] * len(adapters), list(adapters), cfg)


def started(req):
    """Wait for the request's first token."""
    next(iter(req))
    return req


def test_an_adapter_changes_the_output(model, scheduler):
    s, _ = scheduler()
    req = s.submit(PROMPT, [None, "a", "b"], SamplingConfig(max_new_tokens=12, temperature=0, stop_at_eot=False))
    base, a, b = req.result(60)
    assert base != a and base != b and a != b
    assert req.texts() == [tokenizer.decode(r) for r in (base, a, b)]


def test_iterating_a_request_streams_its_tokens_so_far(model, scheduler):
    s, _ = scheduler()
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.9, seed=5, stop_at_eot=False)
    req = s.submit(PROMPT, ["a", "b"], cfg)
    snapshots = list(req)  # a slow reader skips to the latest state, never sees a partial step
    final = req.result()
    assert snapshots and snapshots[-1] == final
    for earlier, later in zip(snapshots, snapshots[1:]):
        assert all(later[i][:len(r)] == r for i, r in enumerate(earlier))  # each one extends the last


def random_requests(n, seed=0):
    """n requests with different adapters, prompt lengths, max tokens, sampling settings and seeds.

    Sampling keeps the top k tokens here: over the whole vocabulary see the near-tie test below."""
    rng = random.Random(seed)
    settings = [dict(temperature=0), dict(temperature=0.8, top_k=50), dict(temperature=1.3, top_k=40, top_p=0.9),
                dict(temperature=1.0, top_k=20), dict(temperature=0.7, top_k=5, top_p=0.5)]
    out = []
    for i in range(n):
        prompt = [rng.randrange(50257) for _ in range(rng.randint(1, 40))]
        adapters = rng.sample([None, "a", "b"], rng.randint(1, 3))
        cfg = SamplingConfig(max_new_tokens=rng.randint(3, 40), seed=rng.randrange(10**6),
                             stop_at_eot=rng.random() < 0.5, **settings[i % len(settings)])
        out.append((prompt, adapters, cfg))
    return out


def test_concurrent_requests_get_exactly_what_each_gets_alone(model, scheduler):
    s, _ = scheduler(max_rows=8)  # fewer slots than rows asked for: some requests wait, then join
    specs = random_requests(12)
    results = [None] * len(specs)

    def client(i):
        results[i] = s.submit(*specs[i], user=f"user{i}").result(120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(specs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for (prompt, adapters, cfg), got in zip(specs, results):
        assert got == alone(model, prompt, adapters, cfg), (adapters, cfg)


@pytest.mark.parametrize("runner", [{}, dict(graphs=True, capture=lambda step, pool: step)],
                         ids=["eager", "captured steps padded to their bucket"])
def test_each_of_sixteen_requests_side_by_side_gets_exactly_what_it_gets_alone(model, runner):
    """16 requests of mixed prompt lengths, adapters, settings and lengths, all decoding together (one of
    them beside 15 others); the captured path (its fixed buffers replayed on the CPU) pads each step up to
    its batch bucket with dummy rows, and rows leave and join as requests end."""
    s = DecodeScheduler(model, max_rows=48, max_len=128, **runner)
    lock = Freeze(s)
    widths, forward = [], s._forward
    s._forward = lambda rows: widths.append(len({id(r.request) for r in rows})) or forward(rows)
    try:
        specs = random_requests(16, seed=11)
        with lock:  # all join at the first iteration
            reqs = [s.submit(*spec) for spec in specs]
        for (prompt, adapters, cfg), req in zip(specs, reqs):
            assert req.result(120) == alone(model, prompt, adapters, cfg), (adapters, cfg)
        assert max(widths) == 16  # every request decoded beside the 15 others
    finally:
        s.close()


def test_on_a_bf16_base_concurrent_requests_still_get_exactly_what_each_gets_alone():
    """--precision bf16 (auto on CPUs with AMX or AVX-512 BF16): bf16's batched products and padded attention
    round differently with the batch, so the adapters' updates and the attention run in fp32 while
    generating on the CPU. Before that, 9 of 16 requests of bench/scheduler.py differed on such a CPU."""
    from adapter_helpers import with_ab
    from core.model.weights import load_base
    model = with_ab(load_base("tiny", device="cpu", dtype=torch.bfloat16))
    s = DecodeScheduler(model, max_rows=16, max_len=128)
    try:
        specs = random_requests(10, seed=3)
        reqs = [s.submit(*spec) for spec in specs]  # all queued at once: they decode side by side
        for (prompt, adapters, cfg), req in zip(specs, reqs):
            assert req.result(120) == alone(model, prompt, adapters, cfg), (adapters, cfg)
        assert s.step_count < sum(c.max_new_tokens for _, _, c in specs)  # they did share steps
    finally:
        s.close()


def test_requests_with_the_same_settings_are_sampled_together_and_each_gets_what_it_gets_alone(
        model, scheduler, monkeypatch):
    """One pick for every request with the same sampling settings (a classroom mostly keeps the defaults):
    each request still draws from its own generator, and each row's token is its solo run's."""
    from core.generate import sampler as sched_module
    s, lock = scheduler(max_rows=16)
    rng = random.Random(3)
    specs = [([rng.randrange(50257) for _ in range(rng.randint(1, 30))], rng.sample([None, "a", "b"], rng.randint(1, 3)),
              SamplingConfig(max_new_tokens=20, temperature=0.8, top_k=50, top_p=0.95, seed=rng.randrange(10**6),
                             stop_at_eot=False)) for _ in range(6)]
    sizes = []
    real = sched_module.pick_tokens
    monkeypatch.setattr(sched_module, "pick_tokens", lambda logits, cfg, u: sizes.append(len(logits)) or real(logits, cfg, u))
    with lock:  # all six join before the first step
        reqs = [s.submit(*spec) for spec in specs]
    got = [r.result(120) for r in reqs]
    assert max(sizes) == sum(len(a) for _, a, _ in specs)  # one call held every request's rows
    for (prompt, adapters, cfg), rows in zip(specs, got):
        assert rows == alone(model, prompt, adapters, cfg)


def test_on_the_cpu_the_decode_thread_runs_torch_loops_on_one_thread_and_leaves_other_threads_theirs(
        model, scheduler, monkeypatch):
    from core.device import openmp_runtime
    from core.generate import sampler as sched_module
    if openmp_runtime() is None:
        pytest.skip("this torch does not run its CPU loops on OpenMP")
    before = torch.get_num_threads()
    seen = []
    real = sched_module.pick_tokens
    monkeypatch.setattr(sched_module, "pick_tokens", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    s, _ = scheduler()
    s.submit(PROMPT, [None, "a"], SamplingConfig(max_new_tokens=3, temperature=0, stop_at_eot=False)).result(60)
    assert seen and set(seen) == {1}  # inside the decode loop
    assert torch.get_num_threads() == before  # this thread (and so the training threads) keep theirs


def test_a_request_joining_mid_decode_gets_what_it_gets_alone(model, scheduler):
    s, lock = scheduler()
    first = started(s.submit(PROMPT, ["a", None], LONG))
    with lock:  # the loop is frozen at a step boundary, `first` mid-decode
        assert not first.done and 0 < first.steps < 100
        second_cfg = SamplingConfig(max_new_tokens=30, temperature=1.1, top_p=0.8, seed=4, stop_at_eot=False)
        second = s.submit(tokenizer.encode("Once upon a time, in a land far away"), ["b", "a", None], second_cfg)
    assert second.result(60) == alone(model, second.prompt, ["b", "a", None], second_cfg)
    assert first.result(60) == alone(model, PROMPT, ["a", None], LONG)
    assert first.first_step < second.first_step <= second.last_step < first.last_step  # they overlapped


def test_a_cancelled_request_frees_its_rows_at_once_and_leaves_the_others_unchanged(model, scheduler):
    s, lock = scheduler(max_rows=6)
    other = started(s.submit(PROMPT, [None, "b"], LONG))
    doomed = started(s.submit(tokenizer.encode("Hello there"), [None, "a", "b", "a"], LONG))  # the other 4 slots
    with lock:
        waiting_cfg = SamplingConfig(max_new_tokens=20, temperature=0, stop_at_eot=False)
        waiting = s.submit(tokenizer.encode("Nobody expects"), ["a", "b"], waiting_cfg)
        assert waiting.position() == 1  # no free slot while `doomed` runs
        tokens_at_cancel = [list(r) for r in doomed.tokens]
        doomed.cancel()
    assert waiting.result(60) == alone(model, waiting.prompt, ["a", "b"], waiting_cfg)
    assert other.result(60) == alone(model, PROMPT, [None, "b"], LONG)
    assert waiting.first_step < other.last_step  # it started while `other` still ran: the slots freed at once
    assert list(doomed) == [tokens_at_cancel] and doomed.cancelled and doomed.done
    assert doomed.tokens == tokens_at_cancel  # not one token after the cancel


def test_a_failing_request_fails_alone(model, scheduler):
    s, _ = scheduler()
    cfg = SamplingConfig(max_new_tokens=15, temperature=0.9, seed=3, stop_at_eot=False)
    good = s.submit(PROMPT, ["a", None], cfg)
    bad = s.submit(PROMPT, ["a", "no-such-adapter"], cfg)
    also_good = s.submit(tokenizer.encode("Second"), ["b"], cfg)
    with pytest.raises(AdapterError, match="'no-such-adapter' is no longer loaded"):
        bad.result(60)
    with pytest.raises(AdapterError, match="'no-such-adapter' is no longer loaded"):
        list(bad)  # the caller iterating it gets the error too
    assert good.result(60) == alone(model, PROMPT, ["a", None], cfg)
    assert also_good.result(60) == alone(model, also_good.prompt, ["b"], cfg)
    assert s.submit(PROMPT, [None], cfg).result(60) == alone(model, PROMPT, [None], cfg)  # still serving


def test_a_full_queue_says_busy_try_again(model, scheduler):
    s, lock = scheduler(max_rows=2, max_queue=2)
    running = started(s.submit(PROMPT, [None, "a"], LONG))
    with lock:
        waiting = [s.submit(PROMPT, ["b"], LONG), s.submit(PROMPT, [None], LONG)]
        assert [r.position() for r in [running] + waiting] == [0, 1, 2]
        with pytest.raises(SchedulerBusy, match="busy, try again in a moment"):
            s.submit(PROMPT, [None], LONG)
        waiting[0].cancel()
        assert waiting[1].position() == 1  # moved up
        running.cancel()
        waiting[1].cancel()
    assert [r.result(60) for r in waiting] == [[[]], [[]]]  # left the queue at once, no token
    assert len(running.result(60)[0]) < 100 and running.cancelled  # stopped at the next step boundary


def test_rows_per_user_are_capped(model, scheduler):
    s, lock = scheduler(max_rows=8, max_rows_per_user=3)
    with lock:
        first = s.submit(PROMPT, [None, "a"], LONG, user="ann")
        with pytest.raises(ValueError, match="limit is 3 rows per user"):
            s.submit(PROMPT, ["a", "b"], LONG, user="ann")
        s.submit(PROMPT, ["a", "b"], LONG, user="bob").cancel()  # another user is not held back
        with pytest.raises(ValueError, match="4 rows in one request"):
            s.submit(PROMPT, [None, "a", "b", None], LONG)
        first.cancel()
    first.result(60)
    s.submit(PROMPT, ["a", "b"], LONG, user="ann").cancel()  # ann's rows were freed


def test_max_tokens_are_capped_by_the_pool_length(model):
    s = DecodeScheduler(model, max_len=16)
    try:
        cfg = SamplingConfig(max_new_tokens=50, temperature=0.9, seed=2, stop_at_eot=False)
        got = s.submit(PROMPT, ["a"], cfg).result(60)
        capped = SamplingConfig(max_new_tokens=15, temperature=0.9, seed=2, stop_at_eot=False)
        assert got == alone(model, PROMPT[-1:], ["a"], capped)  # 15 new tokens after the last prompt token
    finally:
        s.close()


def test_a_failing_decode_step_fails_the_running_requests_and_the_loop_goes_on(model, scheduler, monkeypatch):
    s, lock = scheduler()
    running = started(s.submit(PROMPT, [None, "a"], LONG))
    real = s._forward
    with lock:
        def broken(rows):
            monkeypatch.setattr(s, "_forward", real)  # once
            raise RuntimeError("out of memory (simulated)")
        monkeypatch.setattr(s, "_forward", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        running.result(60)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.7, seed=8)
    assert s.submit(PROMPT, ["b"], cfg).result(60) == alone(model, PROMPT, ["b"], cfg)


def test_the_pool_is_sized_from_free_memory(model, monkeypatch):
    cfg = model.config
    slot = 2 * cfg.n_layer * cfg.n_head * 128 * cfg.head_dim * 4  # fp32 keys and values of 128 tokens
    assert pool_rows(model, 128, memory=40 * slot) == 10  # a quarter of it
    assert pool_rows(model, 128, memory=10**15) == 64 and pool_rows(model, 128, memory=0) == 1
    from core.generate import kv_slots
    monkeypatch.setattr(kv_slots, "available_memory", lambda device: 12 * slot)
    measured = DecodeScheduler(model, max_len=128)  # no max_rows: a quarter of what the device has free
    measured.close()
    assert measured.max_rows == 3 and measured.kv.rows == 3


def test_close_ends_running_requests_and_refuses_new_ones(model, scheduler):
    s, lock = scheduler()
    req = started(s.submit(PROMPT, [None], LONG))
    with lock:
        s.close(timeout=0)  # the loop ends at its next step boundary
    s.close()
    with pytest.raises(SchedulerClosed):
        req.result(10)
    with pytest.raises(SchedulerClosed):
        s.submit(PROMPT, [None], LONG)


def recorder(monkeypatch, module):
    """Record every pick_tokens call of `module` as (cfg, logits, u); the pick itself is unchanged."""
    calls = []
    real = module.pick_tokens

    def pick(logits, cfg, u):
        calls.append((cfg, logits.clone(), None if u is None else u.item()))
        return real(logits, cfg, u)

    monkeypatch.setattr(module, "pick_tokens", pick)
    return calls


def request_recorder(monkeypatch):
    """Record, at each decode step and for each request in it, (cfg, its rows' logits, its uniform draw),
    as `recorder` does for a solo run. The scheduler picks all requests with the same settings in one
    call, so the draw is replayed from a copy of the request's generator (the loop's own is untouched)."""
    from core.generate.scheduler import DecodeScheduler
    calls = []
    real = DecodeScheduler._pick

    def pick(self, rows):
        by_req = {}
        for r in rows:
            by_req.setdefault(r.request, []).append(r)
        for req, rs in by_req.items():
            u = None
            if req.cfg.temperature > 0:
                g = torch.Generator(device=req._gen.device)
                g.set_state(req._gen.get_state())
                u = torch.rand((1, 1), generator=g).item()
            calls.append((req.cfg, torch.stack([r.logits[r.at] for r in rs]), u))
        return real(self, rows)

    monkeypatch.setattr(DecodeScheduler, "_pick", pick)
    return calls


def test_full_vocabulary_sampling_differs_from_solo_only_at_floating_point_near_ties(model, scheduler, monkeypatch):
    """Sampling over all 50257 tokens of the random tiny model (nearly flat: ~2e-5 of probability
    per token) can flip a token: the batch's logits differ from a solo run's in the last bits (~3e-7
    here: a one-row matmul takes another CPU kernel than a many-row one, a one-adapter call scales
    LoRA's B after its matmul where a mixed batch scales it before), and two tokens whose logits are
    that close can swap places in top-p's sorted order, or the draw can sit on a CDF boundary.
    Every row that differs from its solo run is traced at its first difference: the same tokens
    before it, the same uniform draw (the request's own generator, no shared state), logits within
    float noise of the solo run's, and the pick itself turning on that noise: the solo logits give
    the solo token, the batch's give the batch's token, with the same draw."""
    from core.generate import sampler
    s, _ = scheduler(max_rows=8)
    rng = random.Random(7)  # one-row requests: their solo runs take the one-row kernels
    specs = [([rng.randrange(50257) for _ in range(rng.randint(1, 30))], [rng.choice([None, "a", "b"])],
              SamplingConfig(max_new_tokens=30, temperature=1.3, top_k=0, top_p=rng.choice([1.0, 0.9]),
                             seed=rng.randrange(10**6), stop_at_eot=False)) for _ in range(24)]
    batched_calls = request_recorder(monkeypatch)
    reqs = [s.submit(*spec) for spec in specs]
    got = [r.result(120) for r in reqs]
    solo_calls = recorder(monkeypatch, sampler)
    for req, (prompt, adapters, cfg), rows in zip(reqs, specs, got):
        solo_calls.clear()
        solo = alone(model, prompt, adapters, cfg)
        mine = [(logits, u) for c, logits, u in batched_calls if c is req.cfg]  # one pick per step
        for i, (row, solo_row) in enumerate(zip(rows, solo)):
            if row == solo_row:
                continue
            d = next(k for k, (x, y) in enumerate(zip(row, solo_row)) if x != y)  # same tokens before d
            (_, solo_logits, solo_u), (logits, u) = solo_calls[d], mine[d]
            assert u == solo_u  # the request's own generator, in step with the solo run's
            assert (logits[i] - solo_logits[i]).abs().max() < 1e-5  # float noise, nothing more
            draw = torch.tensor([[u]])
            assert int(sampler.pick_tokens(solo_logits[i:i + 1], cfg, draw)) == solo_row[d]
            assert int(sampler.pick_tokens(logits[i:i + 1], cfg, draw)) == row[d]  # the noise decides
