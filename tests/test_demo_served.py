"""The public demo (--demo) through the served studio, as visitors' browsers use it: the page gives each browser
a visitor cookie, and each visitor works in a private sandbox (the --auth privacy rules, with visitors as the
users); the Space owner's gallery is listed for everyone and read-only for everyone; the per-user quotas
refuse in one sentence; a sandbox idle past --demo-idle-minutes is cleaned (its job stopped, its datasets and
adapters deleted). The sweeper's clock is the test's: nothing sleeps.
"""
from __future__ import annotations

import re

import httpx
import pytest

from core.lora.config import LoraConfig
from core.model.weights import load_base
from core.quota import Quota
from core.adapters.library import Library
from core.sandbox import GALLERY
from studio.demo import COOKIE, EPHEMERAL, open_gallery
from studio.tabs import data
from adapter_helpers import make_adapter
from studio_server import served_studio
from test_privacy_served import TRAIN, Page

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
IDLE_MINUTES = 30
MAX_STEPS = 5000


class Visitor(Page):
    """One browser: it opens the page (which sets its visitor cookie), then speaks Gradio's queue protocol."""

    def __init__(self, url: str, cookies=None):
        self.http = httpx.Client(base_url=url, cookies=cookies, timeout=120)
        assert self.http.get("").status_code == 200 and COOKIE in self.http.cookies
        self.config = self.http.get("config").json()
        self.types = {c["id"]: c.get("type") for c in self.config["components"]}
        self.ids = {c.get("props", {}).get("elem_id"): c["id"] for c in self.config["components"]}

    def prepare(self, name: str, text: str) -> list[str]:
        return self.call("prepare_dataset", text, 0.9, name)[1]

    def train(self, dataset: str, name: str, steps: int) -> list[str]:
        form = list(TRAIN)
        form[1], form[2], form[8] = dataset, name, steps
        return self.call("start_training", *form)[1]


def one_sentence(warnings: list[str]) -> str:
    """The one warning shown, checked to be one sentence (no second sentence after a full stop)."""
    assert len(warnings) == 1, warnings
    text = warnings[0]
    assert text.endswith(".") and not re.search(r"[.!?] +[A-Z]", text[:-1]), text
    return text


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    gallery = Library(tmp / "gallery")  # the owner's folder: PEFT folders, as the studio saves them
    model = load_base("tiny", "cpu")
    make_adapter(model, "pirate", LoraConfig(r=4, alpha=8.0), std=0.5)
    gallery.save(model, "pirate", "pirate", LoraConfig(r=4, alpha=8.0), "tiny")
    now = [1_000_000.0]
    quota = Quota.for_studio("0", datasets=1)  # one dataset per visitor (the demo's default is 5)
    with served_studio(tmp, demo={"idle_minutes": IDLE_MINUTES, "clock": lambda: now[0], "ephemeral": True},
                       settings={"quota": quota, "max_job_steps": MAX_STEPS},
                       before_build=lambda studio: open_gallery(studio, tmp / "gallery")) as (url, studio):
        text, _, _ = data.sample_text("pirate_recipes")
        yield url, studio, now, text


def owner_of(studio, dataset: str) -> str:
    return next(d["meta"]["user"] for d in studio.dataset_store.list() if d["name"] == dataset)


def test_demo_mode_is_on_with_demo_and_on_a_space_without_sign_in(monkeypatch):
    import app
    monkeypatch.delenv("SPACE_ID", raising=False)
    args, _, on = app.parse_args([])
    assert not on and args.max_job_steps is None and args.max_adapters_per_user == 100
    args, _, on = app.parse_args(["--demo", "--max-job-steps", "50"])  # the demo's limits, unless given
    assert on and args.max_job_steps == 50 and args.max_adapters_per_user == app.DEMO_DEFAULTS["max_adapters_per_user"]
    assert app.main(["--demo", "--auth", "ann:pw", "--model", "tiny"]) == 2
    monkeypatch.setenv("SPACE_ID", "owner/lora-studio")
    assert app.parse_args([])[2] and not app.parse_args(["--no-demo"])[2]
    assert not app.parse_args(["--auth", "ann:pw"])[2]


def test_the_library_lives_on_a_spaces_persistent_disk_when_there_is_one(monkeypatch, tmp_path):
    import app
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert app.data_dir(None, tmp_path) == app.Path(".") and not app.ephemeral_disk("adapters", tmp_path)
    monkeypatch.setenv("SPACE_ID", "owner/lora-studio")
    assert app.data_dir(None, tmp_path) == tmp_path and not app.ephemeral_disk(tmp_path / "adapters", tmp_path)
    assert app.data_dir(None, tmp_path / "none") == app.Path(".") and app.ephemeral_disk("adapters", tmp_path)
    assert app.data_dir("elsewhere", tmp_path) == app.Path("elsewhere")


def test_a_visitor_counts_against_their_address_too_as_their_cookie_is_their_choice():
    from types import SimpleNamespace as NS
    from studio.context import address_of
    from studio.fair_queue import askers
    assert askers("ann", "s1", "10.0.0.5", True) == [("user", "ann")]  # signed in: the name is the server's
    assert askers("visitor:ab12", "s1", "10.0.0.5", True) == [("user", "visitor:ab12"), ("address", "10.0.0.5")]
    request = NS(client=NS(host="10.0.0.5"))
    assert address_of(request, NS(auth=True, demo=None, users_per_address=4)) is None
    assert address_of(request, NS(auth=True, demo=object(), users_per_address=4)) == "address:10.0.0.5"


def test_who_a_request_is_the_cookie_else_its_session_never_a_shared_name(tmp_path):
    import asyncio
    import json
    from starlette.requests import Request
    from studio.app import create_studio
    from studio.demo import PAGE, install

    mode = install(create_studio(tmp_path / "a", tmp_path / "d", "cpu", "tiny"))

    def who(method="POST", cookie=None, body=None, query=b"", kind=b"application/json"):
        headers = [(b"content-type", kind)] + ([(b"cookie", f"{COOKIE}={cookie}".encode())] if cookie else [])
        raw = json.dumps(body).encode() if body is not None else b""

        async def receive():
            return {"type": "http.request", "body": raw, "more_body": False}
        scope = {"type": "http", "method": method, "path": "/", "headers": headers, "query_string": query}
        return asyncio.run(mode.visitor(Request(scope, receive)))

    secret = "ab" * 16
    assert who(cookie=secret, body={"data": []}) == who("GET", cookie=secret) != who(cookie="cd" * 16)
    assert who(body={"session_hash": "s1"}) == who("GET", query=b"session_hash=s1") != who(body={"session_hash": "s2"})
    assert who(body={"data": []}) != who(body={"data": []}) != PAGE  # an event with neither: a sandbox of its own
    assert who(body={"data": []}, kind=b"") != PAGE  # whatever it says it sends
    assert who(cookie="not-hex!", body={"data": []}) != who(cookie="not-hex!", body={"data": []})
    assert who("GET") == PAGE and who(kind=b"multipart/form-data; boundary=x") == PAGE  # these run no event
    assert PAGE not in mode.sandboxes


def test_work_left_on_disk_by_visitors_before_a_restart_expires_an_idle_time_after_it(tmp_path):
    from studio.app import create_studio
    from studio.demo import install
    text, _, state = data.sample_text("pirate_recipes")
    studio = create_studio(tmp_path / "a", tmp_path / "d", "cpu", "tiny")
    data.prepare(studio, state, text, 0.9, "left-behind", "visitor:0123")
    data.prepare(studio, state, text, 0.9, "signed-in", "ann")  # not a visitor's: never swept
    now = [5_000.0]
    mode = install(studio, idle_minutes=10, clock=lambda: now[0])
    assert mode.sweep() == set()  # the restart does not delete it at once
    now[0] += 600
    assert mode.sweep() == {"visitor:0123"} and [d["name"] for d in studio.dataset_store.list()] == ["signed-in"]
    assert "visitor:0123" not in mode.sandboxes


def test_the_gallery_is_imported_once_and_never_takes_a_visitors_name(tmp_path, capsys):
    from core.sandbox import import_gallery
    model = load_base("tiny", "cpu")
    make_adapter(model, "a", LoraConfig(r=4, alpha=8.0), std=0.5)
    for name in ("shanty", "taken"):
        Library(tmp_path / "gallery").save(model, "a", name, LoraConfig(r=4, alpha=8.0), "tiny")
    library = Library(tmp_path / "adapters")
    library.save(model, "a", "taken", LoraConfig(r=4, alpha=8.0), "tiny", meta={"user": "visitor:0123"})
    assert import_gallery(library, tmp_path / "gallery") == ["shanty"]
    assert "taken skipped: the library already has an adapter named 'taken'" in capsys.readouterr().err
    first = library.details("shanty")
    assert import_gallery(library, tmp_path / "gallery") == ["shanty"]  # a restart keeps it as it is
    assert library.details("shanty")["created"] == first["created"] and first["shared"] is True
    assert library.details("taken")["user"] == "visitor:0123"


def test_an_ephemeral_disk_is_said_once_to_each_visitor(space):
    url, _, _, _ = space
    for visitor in (Visitor(url), Visitor(url)):
        warn = next(d for d in visitor.config["dependencies"]
                    if any(t[1] == "load" for t in d["targets"]) and d["outputs"] == [])
        assert visitor.call(warn)[1] == [EPHEMERAL]
        assert visitor.call(warn)[1] == []


def test_each_visitor_sees_only_their_own_sandbox_and_the_gallery(space):
    url, studio, _, text = space
    ann, bob = Visitor(url), Visitor(url)
    assert ann.prepare("ann-notes", text) == [] and bob.prepare("bob-notes", text) == []
    assert owner_of(studio, "ann-notes") != owner_of(studio, "bob-notes")
    for me, mine in ((ann, "ann-notes"), (bob, "bob-notes")):
        lists = me.lists()
        assert lists["datasets"] == {mine} and lists["picked"] == mine
        assert lists["library"] == lists["compare"] == {"pirate"}
    # naming the other visitor's dataset gets the answer a missing one gets, and starts nothing
    warning = one_sentence(bob.train("ann-notes", "bob-on-ann", 2))
    assert warning == "No dataset named 'ann-notes'; prepare it on the Data tab or pick one from the list."
    assert studio.runs.jobs() == []
    # a reloaded page (the same cookie) is the same sandbox; a cookie of one's own choosing is another one
    assert Visitor(url, cookies=ann.http.cookies).lists()["datasets"] == {"ann-notes"}
    assert Visitor(url, cookies={COOKIE: "0" * 32}).lists()["datasets"] == set()


def test_the_gallery_is_listed_usable_and_read_only_for_every_visitor(space):
    url, studio, _, _ = space
    cat = Visitor(url)
    before = studio.library.details("pirate")
    assert before["user"] == GALLERY and before["shared"] is True
    out, warnings = cat.call("compare", "tiny", False, ["pirate"], "Ahoy", 0.8, 5, 1.0, 4, 3, False)
    assert warnings == [] and out[0].startswith("Ahoy")
    for api, args in (("delete_adapter", ["pirate"]), ("rename_adapter", ["pirate", "mine"]),
                      ("share_adapter", ["pirate", False])):
        warning = one_sentence(cat.call(api, *args)[1])
        assert warning.startswith("'pirate' is in the read-only gallery") or warning.startswith("Sharing is off")
    warning = one_sentence(cat.call("duplicate_adapter", "pirate", "pirate")[1])  # no overwriting it either
    assert warning == "An adapter named 'pirate' already exists; choose another name or delete it first."
    after = studio.library.details("pirate")
    assert (after["user"], after["shared"], after["files"], after["created"]) == \
        (before["user"], before["shared"], before["files"], before["created"])
    # a copy is the visitor's own, and theirs to rename or delete
    assert cat.call("duplicate_adapter", "pirate", "cat-pirate")[1] == []
    assert cat.call("rename_adapter", "cat-pirate", "cat-pirate-2")[1] == []
    assert cat.call("delete_adapter", "cat-pirate-2")[1] == []


def test_the_per_visitor_quotas_refuse_in_one_sentence(space):
    url, studio, _, text = space
    dan = Visitor(url)
    assert dan.prepare("dan-notes", text) == []
    warning = one_sentence(dan.prepare("dan-more", text))
    assert warning.startswith("You already have 1 datasets here, the most one user may keep"), warning
    warning = one_sentence(dan.train("dan-notes", "dan-long", MAX_STEPS + 1))
    assert f"more than the {MAX_STEPS:,} one job may here" in warning, warning
    assert "dan-more" not in {d["name"] for d in studio.dataset_store.list()} and studio.runs.jobs() == []


def test_an_expired_sandbox_is_cleaned_and_the_others_are_kept(space):
    url, studio, now, text = space
    eve, fay = Visitor(url), Visitor(url)
    assert eve.prepare("eve-notes", text) == [] and fay.prepare("fay-notes", text) == []
    assert eve.train("eve-notes", "eve-run", MAX_STEPS) == []
    job = studio.runs.training("eve-run")
    eve_name = owner_of(studio, "eve-notes")
    now[0] += IDLE_MINUTES * 60 - 1
    assert studio.demo.sweep() == set()  # not idle long enough yet
    now[0] += 1
    assert fay.http.get("").status_code == 200  # fay opens the page again: her sandbox is kept
    studio.demo.sweep()  # eve's job is stopped first; her work goes once it has ended
    job.wait(60)
    assert job.state == "stopped"
    assert eve_name in studio.demo.sweep()
    datasets = {d["name"] for d in studio.dataset_store.list()}
    assert "eve-notes" not in datasets and "fay-notes" in datasets
    assert "eve-run" not in studio.library.names() and "pirate" in studio.library.names()
    # eve's browser comes back to an empty sandbox (and the gallery); fay's is as she left it
    eve_lists, fay_lists = eve.lists(), fay.lists()
    assert eve_lists["datasets"] == set() and eve_lists["library"] == {"pirate"}
    assert fay_lists["datasets"] == {"fay-notes"}
