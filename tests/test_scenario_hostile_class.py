"""Issue 26's scenario, against the served studio with real clients: three signed-in students; mallory floods
every queued endpoint and names everything of the others she can think of, while ann and bob each prepare a
dataset, train (their two jobs co-batched), compare and evaluate. Ann and bob see no warning and no error,
and get exactly what they get alone; nothing of theirs changes hands or bytes; mallory is refused.

The solo reference runs first, on a fresh studio of its own with the same names, so every answer can be
compared as it is. Mallory's evaluations are held at a gate (test_fair_queue.Gate) while she floods, so her
per-user cap is full and her refusals do not depend on timing.
"""
from __future__ import annotations

import re
import threading
import uuid

import pytest
import torch
from safetensors.torch import load_file

from studio.tabs import data
from studio_server import served_studio
from test_adapter_lifetime import _call, _one_sentence, _until
from test_fair_queue import EVALUATE, PLAIN, Gate, _answers, _join, _login

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
USERS = [("ann", "pw-ann-scenario"), ("bob", "pw-bob-scenario"), ("mallory", "pw-mallory-scenario")]
ANN, BOB, MALLORY = USERS
SAMPLE = {"ann": "pirate_recipes", "bob": "shakespearean"}
# targets, rank, alpha, dropout, lr, steps, batch, accum, seq_len, eval interval, seed, prompt
RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 12, 2, 1, 32, 0, 7, ""
FLOOD = 12  # mallory's burst of held evaluations: 8 (the per-user cap) accepted, the rest refused


def _names(user: str) -> tuple[str, str]:
    """(dataset, run) of an honest user."""
    return f"{user}-data", f"{user}-run"


def _honest(url: str, studio, user: tuple[str, str], started: threading.Barrier | None = None) -> dict:
    """One student's afternoon: prepare, train, compare, evaluate; every call must pass without a warning."""
    name = user[0]
    dataset, run = _names(name)
    text = data.sample_text(SAMPLE[name])[0]

    def call(api_name, values):
        warnings, outputs = _call(url, user, api_name, values)
        assert warnings == [], (name, api_name, warnings)
        return outputs

    assert "Saved dataset" in call("prepare_dataset", [None, text, 0.9, dataset])[0]
    if started is not None:
        started.wait(120)  # both start together, so their jobs share steps
    assert "Started" in call("start_training", ["tiny", dataset, run, *RUN, *PLAIN, None])[0]
    job = studio.runs.training(run)
    assert job.wait(180) and job.snapshot()["state"] == "finished", job.snapshot()
    files = _files(studio, name)  # from here on nothing may change them
    texts = call("compare", ["tiny", True, [run], "Ahoy", 0.0, 50, 1.0, 24, 3, False])
    table, _, summary = call("evaluate", ["tiny", True, [run], "Dataset split", dataset, "val", "", 16, 256])
    return {"texts": [t for t in texts if isinstance(t, str)], "files": files,
            "table": [row[:4] for row in table["data"]], "summary": re.sub(r"[0-9.]+ s\*\*", "", summary),
            "losses": [(p["step"], p["loss"]) for p in studio.library.history(run)],
            "weights": load_file(studio.library.root / run / "adapter_model.safetensors")}


def _assert_same(got: dict, alone: dict):
    assert got["texts"] == alone["texts"] and got["texts"][1].startswith("Ahoy")
    assert got["summary"] == alone["summary"]
    assert [(m, t) for m, _, _, t in got["table"]] == [(m, t) for m, _, _, t in alone["table"]]
    for figures, solo in zip(got["table"], alone["table"]):  # loss and perplexity, as rounded for the table
        assert figures[1:3] == pytest.approx(solo[1:3], abs=1e-4, rel=1e-4)
    assert [s for s, _ in got["losses"]] == [s for s, _ in alone["losses"]] == list(range(1, 13))
    assert [x for _, x in got["losses"]] == pytest.approx([x for _, x in alone["losses"]], abs=1e-5)
    assert got["weights"].keys() == alone["weights"].keys()
    for key, w in got["weights"].items():
        torch.testing.assert_close(w, alone["weights"][key], atol=1e-5, rtol=0)


def _files(studio, user: str) -> dict:
    """Every file of the user's run and dataset, by path: its bytes; and the run's owner."""
    dataset, run = _names(user)
    files = {p: p.read_bytes() for root in (studio.library.root / run, studio.dataset_path(dataset))
             for p in sorted(root.rglob("*")) if p.is_file()}
    return {"owner": studio.library.details(run).get("user"), **files}


def _attacks() -> list[tuple[str, list]]:
    """Mallory's requests naming ann's and bob's things, and a few bad values."""
    out = []
    for user in ("ann", "bob"):
        dataset, run = _names(user)
        for name in (run, f"train:{run}", f"{run}@step_000012", f"../{run}"):
            out += [("compare", ["tiny", False, [name], "Ahoy", 0.0, 50, 1.0, 8, 3, False]),
                    ("evaluate", ["tiny", False, [name], "Pasted text", None, "val", "Ahoy matey " * 20, 16, 256]),
                    ("token_differences", ["tiny", name, "Ahoy matey, the galley"])]
        out += [("evaluate", ["tiny", True, [], "Dataset split", dataset, "val", "", 16, 256]),
                ("start_training", ["tiny", dataset, "mallory-run", *RUN, *PLAIN, None]),
                ("start_training", ["tiny", "mallory-data", run, *RUN, *PLAIN, None]),
                ("prepare_dataset", [None, "Arr " * 200, 0.9, dataset]),
                ("rename_adapter", [run, "mallory-owns-it"]), ("delete_adapter", [run]),
                ("duplicate_adapter", [run, dataset]), ("restore_checkpoint", [run, "step_000012", run]),
                ("resume_training", [run, 40, "", None]), ("blend_adapters", [[run, run], "", run]),
                ("export_adapter_zip", [run]), ("merge_export", [run]), ("export_gguf_adapter", [run]),
                ("export_metrics_csv", [run]), ("arena_open", ["stolen", "tiny", "Ahoy", [run], 8, 0.0, 1])]
    out += [("compare", ["tiny", True, [], "Ahoy", "hot", None, None, "many", "seed", False]),
            ("evaluate", ["tiny", True, [], "Pasted text", None, "val", "x", None, "many"]),
            ("start_training", ["tiny", "mallory-data", "mallory-run", [], "big", None, None, "lr", "many", None, None,
                                None, None, None, None, *PLAIN, None])]
    return out


class Mallory:
    """Floods, then names the others' things until told to stop; records what she was told."""

    def __init__(self, url: str, studio):
        self.url, self.studio, self.stop = url, studio, threading.Event()
        self.warnings, self.flood_codes, self.error = [], [], None

    def flood(self, gate) -> None:
        """A burst of held evaluations (her cap fills), then one request of bad values to every queued endpoint."""
        cookies = _login(self.url, MALLORY)
        self.burst = [_join(self.url, "evaluate", EVALUATE, "mallory-burst", cookies=cookies) for _ in range(FLOOD)]
        gate.opened.set()
        _answers(self.url, "mallory-burst", sum(r.status_code == 200 for r in self.burst), cookies)
        session = uuid.uuid4().hex
        deps = [d for d in _config(self.url, cookies)["dependencies"] if d.get("queue") and d.get("api_name")]
        joins = [_join(self.url, d["api_name"], [None] * len(d["inputs"]), session, cookies=cookies) for d in deps]
        self.flood_codes = [j.status_code for j in joins]
        _answers(self.url, session, self.flood_codes.count(200), cookies)

    def name_things(self) -> None:
        rounds = 0
        while rounds == 0 or not self.stop.is_set():
            for api_name, values in _attacks():
                warnings, _ = _call(self.url, MALLORY, api_name, values)
                assert all(_one_sentence(w, self.studio) for w in warnings), (api_name, warnings)
                self.warnings += warnings
            rounds += 1

    def run(self, gate, both_started) -> None:
        try:
            self.flood(gate)
            _until(both_started, "ann's and bob's jobs to start", 180)
            self.name_things()
        except BaseException as e:  # reported by the test, in its thread
            self.error = e


def _config(url: str, cookies) -> dict:
    import httpx
    return httpx.get(url + "config", cookies=cookies, timeout=30).json()


def test_a_hostile_student_changes_nothing_for_the_other_two(tmp_path, monkeypatch):
    with served_studio(tmp_path / "alone", auth=USERS) as (url, studio):
        alone = {u[0]: _honest(url, studio, u) for u in (ANN, BOB)}

    with served_studio(tmp_path / "class", auth=USERS) as (url, studio):
        gate, mallory = Gate(studio, monkeypatch), Mallory(url, studio)
        results, errors = {}, []
        started = threading.Barrier(2)

        def student(user):
            try:
                results[user[0]] = _honest(url, studio, user, started)
            except BaseException as e:
                errors.append(e)

        def both_started():
            return all((studio.library.root / _names(u)[1]).exists() for u in ("ann", "bob")) or errors

        attacker = threading.Thread(target=mallory.run, args=(gate, both_started))
        attacker.start()
        _until(lambda: gate.calls >= 1 or mallory.error, "mallory's first evaluation to be held")
        honest = [threading.Thread(target=student, args=(u,)) for u in (ANN, BOB)]
        for t in honest:
            t.start()
        for t in honest:
            t.join(300)
        mallory.stop.set()
        attacker.join(300)
        assert not errors, errors
        assert mallory.error is None, mallory.error
        for user in ("ann", "bob"):
            _assert_same(results[user], alone[user])
        for user in ("ann", "bob"):
            assert results[user]["files"]["owner"] == user
            assert _files(studio, user) == results[user]["files"]  # mallory changed no byte of theirs
        assert [r.status_code for r in mallory.burst] == [200] * 8 + [429] * (FLOOD - 8)
        assert mallory.burst[-1].json()["detail"].startswith("You already have 8 requests waiting or running")
        assert mallory.flood_codes.count(200) >= 8  # each answered (flood() waits), ann's and bob's went on
        assert mallory.warnings  # she was told, in sentences, each time a name was not hers
