"""Private by default under --auth, through the served studio as a class uses it (the teacher is an admin;
alice and bob are students): each signed-in user's lists show their own datasets and adapters, the ones made
before sign-in was on, and adapters their owners shared; the admin sees everything. Naming another user's
private dataset or adapter through the API gets the answer a missing one gets and changes nothing, until
the adapter's owner shares it with the class.

Calls go through Gradio's queue as a page makes them (login cookie, queue/join, the event stream), so the
warning each refusal shows is read too, and the page-load event that fills every list can be asked as well.
"""
from __future__ import annotations

import json
import secrets

import httpx
import pytest

from core.lora.config import LoraConfig
from core.model.weights import load_base
from studio.tabs import data
from adapter_helpers import make_adapter
from studio_server import served_studio

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
USERS = [("teacher", "pw-teacher"), ("alice", "pw-alice"), ("bob", "pw-bob")]
PASSWORD = dict(USERS)
TRAIN = ["tiny", None, "", ["attn.c_attn"], 4, 8, 0.0, 2e-3, 2, 2, 1, 32, 0, 7, "Ahoy", "none", False, False,
         "kaiming", 1.0, "", ""]  # the start_training form; [1] is the dataset, [2] the adapter name


class Page:
    """One signed-in user's session with the served app, speaking Gradio's queue protocol."""

    def __init__(self, url: str, user: str):
        self.http = httpx.Client(base_url=url, timeout=120)
        assert self.http.post("login", data={"username": user, "password": PASSWORD[user]}).status_code == 200
        self.config = self.http.get("config").json()
        self.types = {c["id"]: c.get("type") for c in self.config["components"]}
        self.ids = {c.get("props", {}).get("elem_id"): c["id"] for c in self.config["components"]}

    def dependency(self, api_name: str | None = None, trigger: str | None = None, output: str | None = None) -> dict:
        """The event named `api_name`, or the `trigger` event whose outputs hold the element `output`."""
        for d in self.config["dependencies"]:
            if api_name is not None and d.get("api_name") == api_name:
                return d
            if trigger is not None and any(t[1] == trigger for t in d["targets"]) and self.ids[output] in d["outputs"]:
                return d
        raise KeyError(api_name or trigger)

    def call(self, dep: dict | str, *args) -> tuple[list, list[str]]:
        """(outputs, warnings shown) of one event; a State input is the server's to fill, as a page leaves it."""
        dep = self.dependency(dep) if isinstance(dep, str) else dep
        given = iter(args)
        values = [None if self.types[i] == "state" else next(given) for i in dep["inputs"]]
        session = secrets.token_hex(8)
        r = self.http.post("gradio_api/queue/join", json={"data": values, "fn_index": dep["id"], "session_hash": session,
                                                           "event_data": None, "trigger_id": None})
        assert r.status_code == 200, r.text
        warnings = []
        with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg["msg"] == "log":
                    warnings.append(msg["log"])
                elif msg["msg"] == "process_completed":
                    assert msg["success"], msg
                    return msg["output"]["data"], warnings
        raise AssertionError("the event stream ended before the event completed")

    def lists(self) -> dict[str, set[str]]:
        """What the page shows when it opens: the Train tab's datasets (and the one picked), the Library table and
        the Compare picker's adapters, the Data tab's saved datasets."""
        dep = self.dependency(trigger="load", output="train-dataset")
        out, warnings = self.call(dep)
        assert warnings == []
        by_id = dict(zip(dep["outputs"], out))
        train, compare = by_id[self.ids["train-dataset"]], by_id[self.ids["cmp-adapters"]]
        table = by_id[self.ids["lib-table"]]
        rows = table["value"]["data"] if isinstance(table, dict) and "value" in table else table["data"]
        return {"datasets": {v for _, v in train["choices"]}, "picked": train["value"],
                "library": {r[0] for r in rows}, "compare": {v for _, v in compare["choices"]},
                "saved": by_id.get(self.ids["data-saved"], "")}


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    text, _, state = data.sample_text("pirate_recipes")

    def prepare(studio):
        studio.admins = frozenset({"teacher"})
        data.prepare(studio, state, text, 0.9, "old-notes")  # prepared before sign-in was turned on: no owner
        model = load_base("tiny", "cpu")
        for seed, (name, owner) in enumerate([("old-one", None), ("alice-pirate", "alice"), ("bob-bard", "bob")]):
            make_adapter(model, name, LoraConfig(r=4, alpha=8.0), seed=seed, std=0.5)
            studio.library.save(model, name, name, LoraConfig(r=4, alpha=8.0), "tiny",
                                meta={"user": owner} if owner else {})

    with served_studio(tmp_path_factory.mktemp("privacy"), auth=USERS, before_build=prepare) as (url, studio):
        pages = {user: Page(url, user) for user, _ in USERS}
        _, warnings = pages["alice"].call("prepare_dataset", text, 0.9, "alice-notes")  # the Data tab's Prepare
        assert warnings == []
        yield url, studio, pages


def test_a_prepared_dataset_records_who_prepared_it(classroom):
    _, studio, _ = classroom
    metas = {d["name"]: d["meta"] for d in studio.dataset_store.list()}
    assert metas["alice-notes"]["user"] == "alice" and "user" not in metas["old-notes"]


def test_each_user_lists_only_their_own_work_and_what_is_everyones(classroom):
    _, _, pages = classroom
    bob, alice, teacher = pages["bob"].lists(), pages["alice"].lists(), pages["teacher"].lists()
    assert bob["datasets"] == {"old-notes"} and "alice-notes" not in bob["saved"]
    assert bob["picked"] == "old-notes"
    assert bob["library"] == bob["compare"] == {"old-one", "bob-bard"}
    assert alice["datasets"] == {"old-notes", "alice-notes"} and alice["picked"] == "alice-notes"
    assert alice["library"] == {"old-one", "alice-pirate"} and "alice-notes" in alice["saved"]
    # the teacher sees every dataset and adapter, but no student's dataset is picked for them unasked
    assert teacher["datasets"] == {"old-notes", "alice-notes"} and teacher["picked"] == "old-notes"
    assert teacher["library"] == teacher["compare"] == {"old-one", "alice-pirate", "bob-bard"}
    # the page as built (before anyone signed in) lists no one's private work
    config = json.dumps(pages["bob"].config)
    assert "alice-notes" not in config and "alice-pirate" not in config and "bob-bard" not in config


def test_naming_another_users_dataset_is_refused_as_if_it_did_not_exist(classroom):
    _, studio, pages = classroom
    bob, teacher = pages["bob"], pages["teacher"]
    library_before = {e.name for e in studio.library.list()}
    for dataset in ("alice-notes", "no-such-notes"):
        form = list(TRAIN)
        form[1], form[2] = dataset, f"bob-on-{dataset}"
        _, warnings = bob.call("start_training", *form)
        assert warnings == [f"No dataset named '{dataset}'; prepare it on the Data tab or pick one from the list."]
        _, warnings = bob.call("evaluate", "tiny", True, [], "Dataset split", dataset, "val", "", 32, 256)
        assert warnings == [f"No dataset named '{dataset}'; prepare it on the Data tab or pick one from the list."]
    assert studio.runs.jobs() == [] and {e.name for e in studio.library.list()} == library_before
    (table, _, summary), warnings = teacher.call("evaluate", "tiny", True, [], "Dataset split", "alice-notes", "val",
                                                 "", 32, 256)
    assert warnings == [] and "alice-notes" in summary and table["data"][0][0] == "base"


def test_an_adapter_is_hidden_from_other_students_until_its_owner_shares_it(classroom):
    url, studio, pages = classroom
    alice, bob, teacher = pages["alice"], pages["bob"], pages["teacher"]
    compare = ["tiny", False, ["alice-pirate"], "Ahoy", 0.8, 50, 1.0, 4, 3, False]
    before = {e.name: e for e in studio.library.list()}

    def refused(warnings, name="alice-pirate"):
        return len(warnings) == 1 and warnings[0] == f"No adapter named '{name}' in the library."

    # bob gets exactly what a missing adapter gets, from every action that names one
    assert refused(bob.call("compare", *compare[:2], ["no-such"], *compare[3:])[1], "no-such")
    assert refused(bob.call("compare", *compare)[1])
    assert refused(bob.call("evaluate", "tiny", False, ["alice-pirate"], "Pasted text", None, "val", "Ahoy there",
                            32, 256)[1])
    assert refused(bob.call("token_differences", "tiny", "alice-pirate", "Ahoy there")[1])
    assert refused(bob.call("export_adapter_zip", "alice-pirate")[1])
    assert refused(bob.call("merge_export", "alice-pirate")[1])
    assert refused(bob.call("duplicate_adapter", "alice-pirate", "bobs-copy")[1])
    assert refused(bob.call("blend_adapters", ["bob-bard", "alice-pirate"], "", "bobs-mix")[1])
    assert refused(bob.call("share_adapter", "alice-pirate", True)[1])  # only its owner (or an admin) shares it
    assert {e.name: e for e in studio.library.list()} == before
    # the teacher uses it before it is shared
    out, warnings = teacher.call("compare", *compare)
    assert warnings == [] and out[0].startswith("Ahoy")

    msg, *_ = alice.call("share_adapter", "alice-pirate", True)[0]
    assert "shared with the class" in msg
    assert json.loads((studio.library.root / "alice-pirate" / "studio.json").read_text())["shared"] is True
    assert "alice-pirate" in bob.lists()["compare"] and "alice-pirate" in bob.lists()["library"]
    out, warnings = bob.call("compare", *compare)
    assert warnings == [] and out[0] == teacher.call("compare", *compare)[0][0]  # the same seed, the same text
    # bob may use it, not unshare it; alice can make it private again
    assert bob.call("share_adapter", "alice-pirate", False)[1] == [
        "'alice-pirate' belongs to alice; only they (or an admin) can share it."]
    alice.call("share_adapter", "alice-pirate", False)
    assert "alice-pirate" not in bob.lists()["compare"]
    assert refused(bob.call("compare", *compare)[1])
