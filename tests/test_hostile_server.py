"""Issue 10 against the served studio (launched in-process on 127.0.0.1, driven by gradio_client as any
API client would): what exists now can be named, a hostile value changes nothing, downloads do not stay
on disk, a poisoned library entry does not keep the page from serving, and sign-in rules hold over the API.
"""
from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from gradio_client import Client

from studio.tabs import data
from studio_server import served_studio

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 2, 2, 1, 32, 0, 7, "Ahoy"  # targets ... prompt, 2 steps


def _pirates(studio, name="pirates"):
    text, _, state = data.sample_text("pirate_recipes")
    data.prepare(studio, state, text, 0.9, name)


def _poison(studio):
    """Library entries a hostile upload or a crash could leave: each must be listed, never break the page."""
    root = studio.library.root
    good = root / "seed"
    studio.runs.wait()
    for name, meta in (("surrogate", '{"user": "\\ud800 student", "dataset": "\\udfff"}'),
                       ("broken-json", '{"user": '), ("wrong-types", '{"training": "x", "blend": 5, "history": 7}')):
        (root / name).mkdir(parents=True)
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            (root / name / f).write_bytes((good / f).read_bytes())
        (root / name / "studio.json").write_text(meta)


def _seed_adapter(studio):
    """One trained adapter, the library's 'seed', made before the UI is built."""
    from core.lora.config import LoraConfig
    from core.train.config import TrainConfig
    from core.train.data import load_dataset
    _pirates(studio, "seed-data")
    studio.runs.start("tiny", load_dataset(studio.dataset_path("seed-data")), "seed",
                        LoraConfig(r=4, alpha=8), TrainConfig(steps=2, batch_size=2, seq_len=32, eval_interval=0))
    assert studio.runs.wait(120)["state"] == "finished"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("hostile"), before_build=_seed_adapter) as served:
        yield served


@pytest.fixture
def poisoned(tmp_path):
    """A studio (re)started on a library holding poisoned entries."""
    with served_studio(tmp_path, before_build=lambda s: (_seed_adapter(s), _poison(s))) as served:
        yield served


def _page_load(url: str) -> list:
    """What a page load sends: the outputs of the Blocks' load event (private, yet callable by number)."""
    config = httpx.get(url + "config", timeout=30).json()
    index = next(d["id"] for d in config["dependencies"] if d["targets"] and d["targets"][0][1] == "load")
    join = httpx.post(url + "gradio_api/queue/join", json={"data": [], "fn_index": index, "session_hash": "page"},
                      timeout=30)
    assert join.status_code == 200, join.text
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": "page"}, timeout=60) as r:
        for line in r.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("msg") == "process_completed":
                assert msg.get("success"), msg
                return msg["output"]["data"]
    raise AssertionError("the page load never completed")


def _raw_call(url: str, api_name: str, data: list) -> str:
    """POST /gradio_api/call/<api_name> with ASCII-escaped JSON; the event stream, as text."""
    body = json.dumps({"data": data}, ensure_ascii=True)
    r = httpx.post(f"{url}gradio_api/call/{api_name}", content=body, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return httpx.get(f"{url}gradio_api/call/{api_name}/{r.json()['event_id']}", timeout=120).text


def test_the_page_serves_with_poisoned_library_entries(poisoned):
    url, studio = poisoned
    assert httpx.get(url, timeout=30).status_code == 200
    config = httpx.get(url + "config", timeout=30)  # built at start-up, with the library table in it
    assert config.status_code == 200 and '"surrogate"' in config.text, config.text[:300]
    assert "unreadable" in config.text  # listed, with its reason, instead of breaking the page
    table = next(o for o in _page_load(url) if isinstance(o, dict) and "data" in o)
    assert {"surrogate", "broken-json", "wrong-types", "seed"} <= {row[0] for row in table["data"]}


def test_api_clients_can_name_what_was_made_after_launch(server):
    url, studio = server
    client = Client(url, verbose=False)
    _pirates(studio, "made-later")  # not among the dropdown's choices when the UI was built
    msg, run, *_ = client.predict("tiny", "made-later", "later-run", *RUN, api_name="/start_training")
    assert run == "later-run" and "Started" in msg
    assert studio.runs.wait(120)["state"] == "finished"
    out = client.predict("tiny", False, ["later-run"], "Ahoy", 0.8, 50, 1.0, 4, 3, api_name="/compare")
    assert out[0].startswith("Ahoy")  # the adapter made after launch, in the first column
    status, *_ = client.predict("later-run", "later-renamed", api_name="/rename_adapter")
    assert "Renamed" in status and "later-renamed" in studio.library.names()
    client.close()


def test_a_hostile_value_over_the_api_changes_nothing(server):
    url, studio = server
    client = Client(url, verbose=False)
    before = (sorted(studio.library.names()), sorted(p.name for p in studio.datasets_dir.iterdir()))
    snap = studio.runs.snapshot()
    for dataset in ("never-made", "../datasets"):
        client.predict("tiny", dataset, "hostile-run", *RUN, api_name="/start_training")
    # JSON's \ud800 escape: how a lone surrogate arrives (gradio_client cannot even encode one)
    answer = _raw_call(url, "start_training", ["tiny", "seed-data", "hostile-run", *RUN[:-1], "Ahoy \ud800", "none",
                                               False, False, "kaiming", 1, "", ""])  # + DoRA, the Advanced LoRA fields
    assert answer.startswith("event: complete") and "Started" not in answer  # a warning; outputs unchanged
    client.predict("../etc", "x", api_name="/rename_adapter")
    client.predict("tiny", True, ["../../etc/passwd"], "Hi", 0.8, 50, 1.0, 4, 1, api_name="/compare")
    assert (sorted(studio.library.names()), sorted(p.name for p in studio.datasets_dir.iterdir())) == before
    assert studio.runs.snapshot()["id"] == snap["id"]  # no job was started
    client.close()


def test_a_download_leaves_the_studios_folder_once_handed_over(server):
    url, studio = server
    client = Client(url, verbose=False)
    out = client.predict("seed", api_name="/export_adapter_zip")  # gr.update(value=file, visible=True)
    assert open(out["value"], "rb").read(2) == b"PK"  # the client got the zip ...
    end = time.time() + 20  # ... and the studio's copy goes in the event that follows
    while list(studio.exports_dir.iterdir()) and time.time() < end:
        time.sleep(0.05)
    assert list(studio.exports_dir.iterdir()) == []
    client.close()


USERS = [("ann", "s3cret-ann"), ("bob", "s3cret-bob"), ("root", "s3cret-root")]


@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    def prepare(studio):
        studio.admins = frozenset({"root"})
        _pirates(studio)

    with served_studio(tmp_path_factory.mktemp("hostile-auth"), auth=USERS, before_build=prepare) as served:
        yield served


def test_over_the_api_only_the_owner_or_an_admin_changes_a_run(authed):
    url, studio = authed
    ann, bob, root = (Client(url, auth=u, verbose=False) for u in USERS)
    ann.predict("tiny", "pirates", "anns", *RUN, api_name="/start_training")
    assert studio.runs.wait(120)["user"] == "ann"
    bob.predict("anns", "bobs", api_name="/rename_adapter")  # refused: a warning for bob, nothing changes
    bob.predict("anns", api_name="/delete_adapter")
    bob.predict("anns", 4, api_name="/resume_training")
    assert studio.library.names() == ["anns"] and studio.runs.snapshot()["progress"]["steps"] == 2
    root.predict("anns", 4, api_name="/resume_training")  # an admin resumes; the run stays ann's
    assert studio.runs.wait(120)["user"] == "ann"
    assert json.loads((studio.library.root / "anns" / "studio.json").read_text())["user"] == "ann"
    for c in (ann, bob, root):
        c.close()


def test_admin_must_name_a_signed_in_user(tmp_path):
    import app
    assert app.main(["--admin", "root", "--model", "tiny"]) == 2  # without --auth
    assert app.main(["--admin", "eve", "--auth", "ann:pw", "--model", "tiny"]) == 2
    assert app.build_parser().parse_args(["--admin", "a", "--admin", "b"]).admin == ["a", "b"]


def test_uploads_beyond_the_cache_cap_are_deleted_oldest_first(tmp_path, monkeypatch):
    import studio.app
    monkeypatch.setattr(studio.app, "TRIM_EVERY_S", 0.2)
    monkeypatch.setattr(studio.app, "MAX_CACHE_BYTES", 25_000)
    with served_studio(tmp_path) as (url, _):
        kept = []
        for i in range(4):  # no sign-in needed to POST files: each is 10 KB
            r = httpx.post(url + "gradio_api/upload", files={"files": (f"f{i}.txt", b"%d" % i * 10_000)}, timeout=30)
            kept.append(r.json()[0])
            time.sleep(0.05)
        end = time.time() + 20
        while any(os.path.exists(p) for p in kept[:2]) and time.time() < end:
            time.sleep(0.1)
        assert [os.path.exists(p) for p in kept] == [False, False, True, True]
