"""Issue 26, findings 2 and 5, against the served studio with real HTTP clients: one user's backlog never
refuses another user's first request; without sign-in, pages on one computer (one client address, sent
here as X-Forwarded-For, which the server trusts from its own machine only) share the per-user limits;
a job too large for the server is refused before it is queued; --admin-token stops anyone's job.

Evaluations are held at a gate (the engine's evaluate waits for the test) so that queued requests stay
queued for as long as each test needs: nothing here depends on timing.
"""
from __future__ import annotations

import functools
import json
import threading
from types import SimpleNamespace

import httpx
import pytest
from gradio_client import Client

from studio.tabs import data
from studio_server import served_studio

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
USERS = [("alice", "s3cret-alice"), ("bob", "s3cret-bob")]
EVALUATE = ["tiny", True, [], "Pasted text", None, "val", "Ahoy, the rum is gone and the sea is wide.", 16, 256]
TOKEN = "correct-horse-battery-staple"
HERE, THERE = "10.0.0.7", "10.0.0.8"  # two computers on the network
# targets, rank, alpha, dropout, lr, steps, batch, accum, seq_len, eval interval, seed, prompt
LONG_RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 100_000, 2, 1, 32, 0, 7, "Ahoy"  # 6.4M tokens: within the limit
HUGE_RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 1_000_000, 64, 1, 128, 0, 7, "Ahoy"  # 8.2G tokens
PLAIN = ["none", False, False, "kaiming", 1, "", ""]  # log to, DoRA, rsLoRA, init, LoRA+, patterns (a raw call's)


def _login(url: str, user: tuple[str, str]) -> httpx.Cookies:
    r = httpx.post(url + "login", data={"username": user[0], "password": user[1]}, timeout=30)
    assert r.status_code == 200, r.text
    return r.cookies


@functools.lru_cache
def _fn_index(url: str, api_name: str, cookies: tuple = ()) -> int:
    config = httpx.get(url + "config", cookies=dict(cookies), timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)


def _join(url: str, api_name: str, data: list, session: str, cookies=None, address: str | None = None):
    """What a page sends to queue one request: POST /gradio_api/queue/join."""
    index = _fn_index(url, api_name, tuple(dict(cookies or {}).items()))
    return httpx.post(url + "gradio_api/queue/join", cookies=cookies, timeout=30,
                      headers={"X-Forwarded-For": address} if address else {},
                      json={"data": data, "fn_index": index, "session_hash": session})


def _answers(url: str, session: str, count: int, cookies=None, logs: list | None = None) -> list[dict]:
    """The session's next `count` finished requests, read from its event stream (warnings go to `logs`)."""
    done = []
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, cookies=cookies,
                      timeout=120) as r:
        for line in r.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("msg") == "log" and logs is not None:
                logs.append(msg["log"])
            if msg.get("msg") == "process_completed":
                done.append(msg)
                if len(done) == count:
                    return done
    raise AssertionError(f"only {len(done)} of {count} requests were answered")


def _start_warnings(url: str, run: list, session: str, address: str) -> list[str]:
    """Start training as a page at `address` would; the warnings the page shows."""
    join = _join(url, "start_training", ["tiny", "pirates", *run, *PLAIN, None], session, address=address)
    assert join.status_code == 200, join.text
    logs = []
    _answers(url, session, 1, logs=logs)
    return logs


class Gate:
    """Holds every evaluation at the engine until opened; counts the evaluations that ran."""

    def __init__(self, studio, monkeypatch):
        self.opened, self.calls, real = threading.Event(), 0, studio.engine.evaluate

        def evaluate(*args, **kwargs):
            self.calls += 1
            self.opened.wait(120)
            return real(*args, **kwargs)
        monkeypatch.setattr(studio.engine, "evaluate", evaluate)


def _pirates(studio):
    text, _, state = data.sample_text("pirate_recipes")
    data.prepare(studio, state, text, 0.9, "pirates")


def test_one_users_flood_never_refuses_another_users_first_request(tmp_path, monkeypatch):
    with served_studio(tmp_path, auth=USERS) as (url, studio):
        gate, bob = Gate(studio, monkeypatch), _login(url, USERS[1])
        try:
            flood = [_join(url, "evaluate", EVALUATE, "bob-page", cookies=bob) for _ in range(70)]
            alice = Client(url, auth=USERS[0], verbose=False)  # her first request, while bob's wait
            out = alice.predict("tiny", True, [], "Ahoy", 0.8, 50, 1.0, 4, 1, api_name="/compare")
            assert any(isinstance(o, str) and o.startswith("Ahoy") for o in out), out
            assert _join(url, "evaluate", EVALUATE, "alice-page", cookies=_login(url, USERS[0])).status_code == 200
            alice.close()
        finally:
            gate.opened.set()
        accepted = [r for r in flood if r.status_code == 200]
        assert len(accepted) == studio.max_queued_per_user == 8
        refused = flood[8:]
        assert {r.status_code for r in refused} == {429}
        assert refused[0].json()["detail"] == ("You already have 8 requests waiting or running (the limit is 8); "
                                               "wait for them to finish, then try again.")
        assert all(m["success"] for m in _answers(url, "bob-page", 8, bob))  # each accepted one is answered
        assert _join(url, "evaluate", EVALUATE, "bob-page", cookies=bob).status_code == 200  # room again
        _answers(url, "bob-page", 1, bob)
        assert gate.calls == 8 + 1 + 1  # bob's accepted, alice's, bob's last: a refused request never ran


@pytest.fixture(scope="module")
def open_studio(tmp_path_factory):
    """No sign-in; an address counts as one user (--users-per-address 1); --admin-token TOKEN."""
    def prepare(studio):
        studio.users_per_address = studio.runs.users_per_address = 1
        studio.admin_token = TOKEN
        _pirates(studio)

    with served_studio(tmp_path_factory.mktemp("open"), before_build=prepare) as served:
        yield served


def test_without_sign_in_two_pages_on_one_computer_share_the_cap(open_studio, monkeypatch):
    url, studio = open_studio
    gate = Gate(studio, monkeypatch)
    try:
        first = [_join(url, "evaluate", EVALUATE, "first-page", address=HERE) for _ in range(5)]
        second = [_join(url, "evaluate", EVALUATE, "second-page", address=HERE) for _ in range(4)]
        elsewhere = _join(url, "evaluate", EVALUATE, "elsewhere", address=THERE)
    finally:
        gate.opened.set()
    assert [r.status_code for r in first + second] == [200] * 8 + [429]
    assert second[-1].json()["detail"] == ("Your address already has 8 requests waiting or running (the limit is 8 "
                                           "for all pages from one address); wait for them to finish, then try "
                                           "again.")
    assert elsewhere.status_code == 200  # another computer's first request
    _answers(url, "first-page", 5), _answers(url, "second-page", 3), _answers(url, "elsewhere", 1)
    assert gate.calls == 9


def test_without_sign_in_a_second_page_on_one_computer_cannot_start_a_second_job(open_studio):
    url, studio = open_studio
    first = Client(url, headers={"X-Forwarded-For": HERE}, verbose=False)
    msg, run, *_ = first.predict("tiny", "pirates", "first-job", *LONG_RUN, api_name="/start_training")
    assert run == "first-job" and "Started" in msg
    warnings = _start_warnings(url, ["second-job", *LONG_RUN], "second-page", HERE)
    assert warnings == ["Your address already has 1 training job queued or running, the limit for all pages from "
                        "one address (1); wait for one to finish, or stop it."]
    assert [j.name for j in studio.runs.scheduler.live()] == ["first-job"]
    assert not (studio.library.root / "second-job").exists()
    studio.runs.stop_all()
    first.close()


def test_a_job_beyond_the_token_limit_is_refused_in_one_sentence(open_studio):
    url, studio = open_studio
    assert "A job may train at most 100,000,000 tokens" in httpx.get(url + "config", timeout=30).text  # shown
    warnings = _start_warnings(url, ["huge-job", *HUGE_RUN], "huge-page", THERE)
    assert warnings == ["This job would train 8,192,000,000 tokens (1,000,000 steps of 8,192), more than the "
                        "100,000,000 one job may here; lower the steps to at most 12,207, or the batch, accumulation "
                        "or sequence length."]
    assert studio.runs.scheduler.live() == [] and not (studio.library.root / "huge-job").exists()


def test_the_admin_token_stops_another_clients_job(open_studio):
    url, studio = open_studio
    owner = Client(url, headers={"X-Forwarded-For": HERE}, verbose=False)
    admin = Client(url, headers={"X-Forwarded-For": THERE}, verbose=False)
    owner.predict("tiny", "pirates", "owned-job", *LONG_RUN, api_name="/start_training")
    job = studio.runs.training("owned-job")
    assert "only they (or an admin) can stop it" in admin.predict(str(job.id), "", api_name="/stop_training")
    assert "admin token is wrong" in admin.predict(str(job.id), TOKEN + "x", api_name="/stop_training")
    assert job.live
    admin.predict(str(job.id), TOKEN, api_name="/stop_training")
    job.wait(120)
    assert job.snapshot()["state"] == "stopped"
    owner.close(), admin.close()


def test_past_the_queue_size_only_someone_with_nothing_waiting_gets_in():
    """The rule behind the global bound, on a stand-in for Gradio's queue: 64 users each with one request
    waiting fill it; a 65th user's first request is accepted, a second request of anyone is refused."""
    from studio.fair_queue import CEILING, FairQueue

    class Queue:  # what FairQueue reads of Gradio's: the live events, and len() = those waiting
        def __init__(self):
            self.event_ids_to_events = {}

        def __len__(self):
            return len(self.event_ids_to_events)

        def add(self, user):
            self.event_ids_to_events[len(self)] = SimpleNamespace(username=user, session_hash=None, request=None)

        async def push(self, body, request, username):
            raise AssertionError("not called here")

    queue = Queue()
    for i in range(64):
        queue.add(f"u{i}")
    fair = FairQueue(queue, per_user=8, users_per_address=4, max_waiting=64)
    assert fair.refusal([("user", "newcomer")]) is None
    assert fair.refusal([("user", "u3")]) == ("The server is busy (64 requests waiting) and you already have one "
                                              "waiting or running; wait for it to finish, then try again.")
    for i in range(64 * (CEILING - 1)):
        queue.add(f"v{i}")
    assert fair.refusal([("user", "newcomer")]) == ("The server is overloaded (256 requests waiting); try again "
                                                    "in a few minutes.")  # the ceiling: a bound on memory


def test_the_new_flags_refuse_bad_values(tmp_path, capsys):
    import app
    base = ["--model", "tiny", "--library", str(tmp_path / "a"), "--datasets", str(tmp_path / "d")]
    assert app.main([*base, "--admin-token", "short"]) == 2
    assert "--admin-token must be at least 16" in capsys.readouterr().err
    for flag, value in (("--max-job-tokens", "0"), ("--max-job-tokens", "nan"), ("--max-queued-per-user", "0"),
                        ("--users-per-address", "-1")):
        assert app.main([*base, flag, value]) == 2
        assert f"{flag} must be a whole number" in capsys.readouterr().err
    assert app.users_per_address(None) == 4 and app.job_tokens(1e8) == 100_000_000
