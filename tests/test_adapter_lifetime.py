"""Which adapters a request may name, and how long a loaded adapter lives (issue 26, finding 1).

A request names library adapters only (Engine.check_adapter, the one rule every entry point uses), never a
name that is merely loaded: a training run's live 'train:<run>' (another user's unfinished work) or a replaced
version 'x~2'. An adapter a running request uses stays loaded until its last user ends, whoever removes it
(a training run ending, eviction, the library), and a request whose adapter is gone anyway fails alone.
"""
from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from gradio_client import Client

from adapter_helpers import LX, LY, make_adapter
from core.adapters.validate import AdapterError
from core.engine import BaseInUse
from core.generate.sampling import SamplingConfig, generate
from core.generate.scheduler import DecodeScheduler
from core.lora.layers import adapter_names, add_adapter, remove_adapter
from core.model import tokenizer
from studio.tabs import data
from studio_server import served_studio

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
PROMPT = "The quick brown fox"
GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0)
LONG = SamplingConfig(max_new_tokens=100, temperature=0.8, seed=9, stop_at_eot=False)


def _last(it):
    out = None
    for out in it:
        pass
    return out


@pytest.fixture
def eng(engine_xy):
    return engine_xy


# ---- the engine: library names only ------------------------------------------------------------

def test_no_entry_point_takes_a_name_that_is_only_loaded(eng, tmp_path, source):
    model = eng.shared_model()
    with eng.lock:  # as a training run adds its live adapter
        add_adapter(model, "train:run1", LY)
    eng.load("x")
    make_adapter(source, "x2", LX, seed=7, std=0.3)
    eng.library.delete("x")
    eng.library.save(source, "x2", "x", LX, "tiny")  # x rewritten in the library ...
    assert eng.load("x") == "x~2"  # ... is loaded beside the old version under an internal name
    ids = tokenizer.encode("Ahoy there, matey, the galley smells of bread " * 8)
    for name in ("train:run1", "x~2"):
        assert name in adapter_names(model)
        with pytest.raises(AdapterError, match=f"invalid adapter name '{name}'"):
            eng.check_adapter(name)
        with pytest.raises(AdapterError, match=f"invalid adapter name '{name}'"):
            eng.compare(PROMPT, [None, name], GREEDY)
        with pytest.raises(AdapterError, match=f"invalid adapter name '{name}'"):
            eng.evaluate(ids, [None, name], seq_len=16)
        with pytest.raises(AdapterError, match=f"invalid adapter name '{name}'"):
            eng.token_differences(PROMPT, name)
        with pytest.raises(AdapterError, match=f"invalid adapter name '{name}'"):
            eng.export_merged(name, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert eng.check_adapter("x") == "x" and _last(eng.compare(PROMPT, ["x"], GREEDY))[0]


# ---- the engine: an adapter in use stays until its last user ends -------------------------------

def test_an_adapter_retired_while_a_compare_uses_it_stays_until_the_compare_ends(eng):
    """Engine.retire is how a training run's adapter leaves when the run ends (TrainScheduler.for_engine)."""
    model = eng.shared_model()
    solo = _last(eng.compare(PROMPT, [None, "x"], LONG))
    stream = eng.compare(PROMPT, [None, "x"], LONG)
    next(stream)  # the request runs: 'x' is pinned until the stream ends
    with eng.lock:  # the decode loop is frozen at a step boundary
        eng.retire(model, "x")
        assert "x" in adapter_names(model)
    assert _last(stream) == solo
    assert "x" not in adapter_names(model)  # removed once its last user ended


def test_no_request_can_switch_the_base_under_another_running_request(eng, hf_small):
    model = eng.shared_model()
    solo = _last(eng.compare(PROMPT, [None, "x"], LONG))
    stream = eng.compare(PROMPT, [None, "x"], LONG)
    next(stream)  # running on the loaded base
    with pytest.raises(BaseInUse, match="the base model tiny is generating or evaluating for other requests, so it "
                                        "cannot change to small now; choose tiny, or try again in a moment."):
        eng.base("small", weights=hf_small)
    assert eng.shared_model() is model
    assert _last(stream) == solo
    assert eng.base("small", weights=hf_small) is not model  # free again once the request ended


def test_loading_a_requests_next_adapter_never_evicts_one_it_already_chose(eng):
    eng.max_loaded = 1
    want = [_last(eng.compare(PROMPT, [a], GREEDY))[0] for a in ("x", "y")]
    assert _last(eng.compare(PROMPT, ["x", "y"], GREEDY)) == want
    ev = eng.evaluate(tokenizer.encode("Ahoy there, matey " * 10), ["x", "y"], seq_len=16)
    assert [s.name for s in ev.scores] == ["x", "y"]
    eng.library.duplicate("x", "z")
    eng.load("z")  # once unpinned, they are evicted again, down to max_loaded
    assert list(eng.loaded()) == ["z"] and adapter_names(eng.shared_model()) == ["z"]


# ---- the scheduler: a request whose adapter vanishes fails alone --------------------------------

def _removing_at_step(s: DecodeScheduler, model, name: str, step: int):
    """s's decode step, which first removes adapter `name` from the model at step `step` (what a training run's
    end does between two steps), so 'while both requests decode' is a fact, not a race."""
    decode = s._step

    def step_():
        if s.step_count == step and name in adapter_names(model):
            remove_adapter(model, name)
        decode()
    return step_


def test_a_request_whose_adapter_vanishes_mid_decode_fails_alone_with_one_sentence(tiny_ab):
    model = tiny_ab
    prompt = tokenizer.encode(PROMPT)
    other_cfg = SamplingConfig(max_new_tokens=60, temperature=0.9, seed=4, stop_at_eot=False)
    solo = generate(model, [prompt] * 2, [None, "b"], other_cfg)
    s = DecodeScheduler(model, max_len=128)
    s._step = _removing_at_step(s, model, "a", step=5)
    try:
        with s._cond:  # both are admitted at the same step boundary
            doomed = s.submit(prompt, ["a", None], LONG)
            other = s.submit(prompt, [None, "b"], other_cfg)
        with pytest.raises(AdapterError) as err:
            doomed.result(60)
        msg = str(err.value)
        assert msg == "the adapter 'a' is no longer loaded (it was removed while this request waited or generated); " \
                      "generate again."
        assert 0 < doomed.steps < 100 and doomed.last_step >= 5  # it was decoding when 'a' went
        assert other.result(60) == solo  # the unrelated request finished with its own text
        assert other.first_step <= 5 < other.last_step
        assert s.submit(prompt, ["b"], other_cfg).result(60) == solo[1:]  # the loop still serves
    finally:
        s.close()


# ---- through the served studio, signed in ----------------------------------------------------------

USERS = [("alice", "pw-alice-1"), ("bob", "pw-bob-22"), ("teacher", "pw-teacher-3")]
RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 5000, 2, 1, 32, 0, 7, ""  # targets ... steps (a long run), ... prompt


def _pirates(studio):
    text, _, state = data.sample_text("pirate_recipes")
    data.prepare(studio, state, text, 0.9, "pirates")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("lifetime"), auth=USERS, before_build=_pirates) as s:
        yield s


def _until(cond, what: str, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.02)


def _train(client: Client, studio, run: str):
    """Start a long run as `client`'s user; returns its job once its live adapter is on the shared base."""
    msg, *_ = client.predict("tiny", "pirates", run, *RUN, api_name="/start_training")
    assert "Started" in msg, msg
    _until(lambda: f"train:{run}" in adapter_names(studio.engine.model), f"train:{run} to load")
    return studio.runs.training(run)


def _call(url: str, user: tuple[str, str], api_name: str, values: list) -> tuple[list[str], list | None]:
    """Call an endpoint over Gradio's queue as a page does: (its warning toasts, its last outputs)."""
    with httpx.Client(base_url=url, timeout=120) as http:
        assert http.post("login", data={"username": user[0], "password": user[1]}).status_code == 200
        deps = http.get("config").json()["dependencies"]
        index = next(d["id"] for d in deps if d.get("api_name") == api_name)
        session = uuid.uuid4().hex
        join = http.post("gradio_api/queue/join", json={"data": values, "fn_index": index, "session_hash": session})
        assert join.status_code == 200, join.text
        warnings, outputs = [], None
        with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as r:
            for line in r.iter_lines():
                msg = json.loads(line[5:]) if line.startswith("data:") else {}
                if msg.get("msg") == "log" and msg.get("level") == "warning":
                    warnings.append(msg["log"])
                if msg.get("msg") in ("process_generating", "process_completed") and msg.get("output"):
                    outputs = msg["output"].get("data", outputs)
                if msg.get("msg") == "process_completed":
                    assert msg.get("success"), msg  # a refusal is a warning, never a failed event
                    return warnings, outputs
    raise AssertionError(f"{api_name} never completed")


def _one_sentence(text: str, studio) -> bool:
    return (text.endswith(".") and "\n" not in text and len(text) < 300 and "Traceback" not in text
            and str(studio.library.root) not in text)


def test_no_user_can_name_another_users_live_training_adapter(served):
    url, studio = served
    alice = Client(url, auth=USERS[0], verbose=False)
    job = _train(alice, studio, "alice-run")
    try:
        live = "train:alice-run"
        calls = {
            "compare": ["tiny", False, [live], "Ahoy", 0.8, 50, 1.0, 24, 3, False],
            "evaluate": ["tiny", True, [live], "Pasted text", None, "val", "Ahoy matey " * 40, 16, 256],
            "token_differences": ["tiny", live, "Ahoy matey, the galley"],
            "merge_export": [live],
            "export_adapter_zip": [live],
            "blend_adapters": [[live, live], "", "stolen"],
        }
        for api_name, values in calls.items():
            warnings, outputs = _call(url, USERS[1], api_name, values)
            assert len(warnings) == 1 and live in warnings[0], (api_name, warnings, outputs)
            assert _one_sentence(warnings[0], studio), warnings[0]
            assert not any(isinstance(o, str) and o.startswith("Ahoy") for o in outputs or []), (api_name, outputs)
        assert "stolen" not in studio.library.names()
    finally:
        alice.predict(api_name="/stop_training")
        assert job.wait(60)


class _Gate:
    """Holds the work loop's decode steps: at the first step where `when()` holds, decoding pauses (rows keep
    their place and text) until the next `hold` or `release`, while side work (a training run's steps, its end)
    goes on; `paused` is set while it holds."""

    def __init__(self, sched):
        self.when, self.held = None, False
        self.paused, self.go = threading.Event(), threading.Event()
        decode, take = sched._step, sched._side.take
        sched._side.take = lambda decoding: take(False)  # a held step decodes nothing: side work owes it nothing

        def gated():
            if self.when is not None and self.when():
                self.when, self.held = None, True
                self.paused.set()
            if self.held and not self.go.wait(0.01):
                return
            self.held = False
            decode()
        sched._step = gated

    def hold(self, when):
        """Pause at the next step where `when()` holds (a paused loop goes on to it)."""
        self.paused, self.go, self.when, self.held = threading.Event(), threading.Event(), when, False

    def release(self):
        self.when = None
        self.go.set()


def test_a_training_run_ending_mid_compare_leaves_an_unrelated_compare_unchanged(served):
    """Bob compares with his own run's live adapter and stops the run while the teacher's long compare streams:
    bob's request is refused, and the teacher's text is the one it gets alone."""
    url, studio = served
    teacher, bob = Client(url, auth=USERS[2], verbose=False), Client(url, auth=USERS[1], verbose=False)
    long_compare = ["tiny", True, [], "Once upon a time", 0.8, 50, 1.0, 512, 11]
    solo = teacher.predict(*long_compare, api_name="/compare")[0]
    assert len(tokenizer.encode(solo)) > 100
    job = _train(bob, studio, "bob-run")
    sched = studio.engine.scheduler()
    gate = _Gate(sched)
    try:
        gate.hold(lambda: any(r.request.steps >= 3 for r in sched._rows))
        mid = teacher.submit(*long_compare, api_name="/compare")
        assert gate.paused.wait(60)  # the teacher's compare is decoding
        bobs = bob.submit("tiny", False, ["train:bob-run"], "Ahoy", 0.8, 50, 1.0, 512, 3, api_name="/compare")
        _until(lambda: bobs.done() or any(r.user == "user:bob" for r in list(sched._queue)), "bob's compare")
        # on to the next step boundary, with bob's request decoding beside the teacher's if it runs
        gate.hold(lambda: bobs.done() or len({id(r.request) for r in sched._rows}) >= 2)
        assert gate.paused.wait(60)
        assert "Stopping" in bob.predict(api_name="/stop_training")
        assert job.wait(60) and "train:bob-run" not in adapter_names(studio.engine.model)
        gate.release()
        assert mid.result(120)[0] == solo
        assert not any(isinstance(o, str) and o.startswith("Ahoy") for o in bobs.result(60) or [])  # refused
    finally:
        gate.release()
