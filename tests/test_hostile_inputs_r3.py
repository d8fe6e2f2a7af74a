"""Issue 26, findings 7 and 8: hostile values through the served studio's API, and hostile records files.

Finding 8: an API client may send any JSON for any input. Every parameter of every public endpoint, sent
None, text, an empty list or 1e300, gets one sentence back (a warning, or Gradio's own bounds message), never a
blank "Error" (the shape of an exception raised inside Gradio's conversion, before the handler).
Finding 7: a records file's field names and values reach pages and meta.json only as valid Unicode; a huge
JSON number is named by file and line; a file over the record cap is refused while it is read, not after.
"""
from __future__ import annotations

import functools
import json
import re

import httpx
import pytest
from gradio_client import Client

from core.train import imports
from core.train.imports import Fields, read_file, read_records
from studio.tabs import data, data_records
from studio_server import served_studio

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
BAD_VALUES = (None, "abc", [], 1e300)  # for finding 8's inputs, which must refuse each of them:
TYPED = ("Slider", "Number", "Checkboxgroup")
OTHER_BAD = (None, [])  # for every other input (a list is the wrong kind for all but the multi-selects)
# defaults that are good except where a test puts a bad value: no call below starts a job or writes a dataset.
# Start, Evaluate and Resume name a dataset or run that does not exist, refused after the settings' checks.
GOOD = {"/start_training": {"dataset": "never-made"}, "/evaluate": {"dataset": "never-made"},
        "/resume_training": {"run_name": "never-made"}}
NONE_IS_DEFAULT = {"dropout", "loraplus_lr_ratio", "total_steps"}  # None: no dropout, plain LoRA, the run's own total


def _seed(studio):
    text, _, state = data.sample_text("pirate_recipes")
    data.prepare(studio, state, text, 0.9, "pirates")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("inputs"), before_build=_seed) as served:
        yield served


def _call(url: str, dep: dict, data: list) -> tuple[list[str], dict]:
    """One event as a page sends it (queue join, then its event stream): (warning texts, the final message)."""
    if not dep["queue"]:  # a quick, unqueued action (Stop) answers at once
        r = httpx.post(f"{url}gradio_api/run/{dep['api_name']}", json={"data": data}, timeout=60)
        body = r.json()
        return [], {"success": r.status_code == 200, "output": {"error": body.get("error")}, "data": body}
    session = f"s{abs(hash((dep['api_name'], json.dumps(data))))}"
    join = httpx.post(url + "gradio_api/queue/join", timeout=30,
                      json={"data": data, "fn_index": dep["id"], "session_hash": session})
    assert join.status_code == 200, join.text
    warnings = []
    with httpx.stream("GET", url + "gradio_api/queue/data", params={"session_hash": session}, timeout=120) as r:
        for line in r.iter_lines():
            msg = json.loads(line[5:]) if line.startswith("data:") else {}
            if msg.get("msg") == "log":
                warnings.append(msg.get("log") or "")
            if msg.get("msg") == "process_completed":
                return warnings, msg
    raise AssertionError(f"{dep['api_name']} never completed")


def _one_sentence(text: str) -> bool:
    return bool(text) and "\n" not in text.strip() and "Traceback" not in text and len(text) < 400


def _endpoints(url: str) -> list[tuple[dict, list[dict]]]:
    """Every public endpoint: its dependency in the page's config and its parameters (with their defaults)."""
    info = Client(url, verbose=False).view_api(return_format="dict", print_info=False)["named_endpoints"]
    config = httpx.get(url + "config", timeout=30).json()
    deps = {"/" + d["api_name"]: d for d in config["dependencies"] if d.get("api_name")}
    return [(deps[name], ep["parameters"]) for name, ep in info.items() if name in deps]


def _data(url: str, dep: dict, values: list) -> list:
    """The API's parameter values with None for the page's hidden state inputs, in the event's input order."""
    values = iter(values)
    return [None if _kinds(url)[i] == "state" else next(values) for i in dep["inputs"]]


@functools.cache
def _kinds(url: str) -> dict:
    return {c["id"]: c["type"] for c in httpx.get(url + "config", timeout=30).json()["components"]}


def test_every_input_of_every_endpoint_gets_one_sentence(server):
    url, studio = server
    blank, quiet, checked = [], [], 0
    for dep, params in _endpoints(url):
        good = [GOOD.get("/" + dep["api_name"], {}).get(p["parameter_name"], p.get("parameter_default"))
                for p in params]
        for i, p in enumerate(params):
            for bad in BAD_VALUES if p["component"] in TYPED else OTHER_BAD:
                sent = list(good)
                sent[i] = bad
                warnings, done = _call(url, dep, _data(url, dep, sent))
                checked += 1
                where = f"/{dep['api_name']} {p['parameter_name']}={bad!r}"
                error = (done.get("output") or {}).get("error")
                if not done.get("success") and not error:
                    blank.append(where)
                elif p["component"] in TYPED and not (bad is None and p["parameter_name"] in NONE_IS_DEFAULT) \
                        and (done.get("success") and not warnings or any("never-made" in w for w in warnings)):
                    quiet.append(where)  # a bad number or list was taken as if it were good
                for text in warnings + ([error] if error else []):
                    assert _one_sentence(text), (where, text)
    assert checked > 150
    assert not blank, f"blank 'Error' for: {blank}"
    assert not quiet, f"accepted without a word: {quiet}"
    assert studio.runs.snapshot() is None and sorted(studio.library.names()) == []


@pytest.mark.parametrize("api, name, bad, says", [
    ("/compare", "temperature", None, "temperature is empty or not a number"),
    ("/compare", "top_k", "abc", "top-k is empty or not a number"),
    ("/start_training", "rank", None, "rank is empty"),
    ("/start_training", "targets", None, None),
    ("/start_training", "targets", "abc", "target modules must be a list"),
    ("/start_training", "dropout", "abc", "dropout is empty or not a number"),
    ("/evaluate", "seq_len", "abc", "sequence length is empty or not a number"),
    ("/import_adapter", "files", "abc", "is not of the kind that field takes"),
])
def test_the_sentence_names_the_input(server, api, name, bad, says):
    url, _ = server
    dep, params = next((d, p) for d, p in _endpoints(url) if "/" + d["api_name"] == api)
    sent = [GOOD.get(api, {}).get(p["parameter_name"], p.get("parameter_default")) for p in params]
    sent[[p["parameter_name"] for p in params].index(name)] = bad
    warnings, done = _call(url, dep, _data(url, dep, sent))
    said = " ".join(warnings + [str((done.get("output") or {}).get("error") or "")])
    if says is None:  # None for a checkbox group: no boxes ticked, refused by the configuration's own check
        assert said.strip() and "never-made" not in said, said
    else:
        assert says.lower() in said.lower(), said


# ---- finding 7: records files --------------------------------------------------------------------

def test_a_lone_surrogate_in_a_field_name_or_value_is_refused_with_its_line(studio, tmp_path):
    for body, line, what in (('{"prompt": "a", "response": "b"}\n{"\\ud800": "x", "response": "y"}\n', 2,
                              "a field name"),
                             ('[{"prompt": "a", "response": "b"}, {"prompt": "\\udfff", "response": "y"}]', 2,
                              "field 'prompt'")):
        f = tmp_path / ("bad.jsonl" if body.startswith("{") else "bad.json")
        f.write_text(body, "utf-8")
        where = f"line {line}" if f.suffix == ".jsonl" else f"record {line}"
        with pytest.raises(ValueError, match=rf"{f.name}: {where}: {what} holds invalid Unicode \(a lone surrogate"):
            data_records.inspect_upload(str(f))  # the preview and the pickers never get the field
        with pytest.raises(ValueError, match="lone surrogate"):
            data_records.prepare_records(studio, str(f), "prompt", "response", "", data_records.DEFAULT_TEMPLATE,
                                         0.9, "surrogates")
        assert not (studio.datasets_dir / "surrogates").exists()  # no meta.json holds the field name


def test_a_number_too_long_to_read_is_named_by_file_and_line(tmp_path):
    digits = "9" * 5000
    for name, body, where in (("long.jsonl", f'{{"a": "x"}}\n{{"a": {digits}}}\n', "line 2"),
                              ("long.json", f'[{{"a": "x"}},\n {{"a": {digits}}}]', r"line 2 \(record 2\)")):
        with pytest.raises(ValueError, match=rf"^{name}: {where} holds a number too long to read \(over 4,300 "
                                             rf"digits\); give it as a string, in quotes\.$"):
            read_records(body.encode(), name)


@pytest.mark.parametrize("name, records, junk", [
    ("many.json", "[" + ", ".join(['{"a": "x"}'] * 5) + ", ", "not json at all"),
    ("many.jsonl", '{"a": "x"}\n' * 5, "not json at all\n"),
    ("many.csv", "a\n" + "x\n" * 5, "x,y,z\n"),
])
def test_reading_stops_at_the_record_cap(monkeypatch, name, records, junk):
    """Records are read one at a time and the file is refused at the cap: what lies beyond it is never parsed
    (a whole-file parse of a 32 MB file of {} held over 1 GB before the cap was checked)."""
    monkeypatch.setattr(imports, "MAX_RECORDS", 5)
    with pytest.raises(ValueError, match=rf"^{name} has more than 5 (records|rows); use a smaller part of it\.$"):
        read_records((records + junk).encode(), name)
    assert len(read_records(records.rstrip(", ").encode() + (b"]" if name.endswith(".json") else b""), name)) == 5


def test_the_token_view_parses_an_upload_once(monkeypatch, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(20)), "utf-8")
    parsed = []
    real = data_records.read_records
    monkeypatch.setattr(data_records, "read_records", lambda *a: parsed.append(a[1]) or real(*a))
    path, *_ = data_records.inspect_upload(str(f))
    for picked in (("prompt", "response", ""), ("response", "prompt", ""), ("", "", "prompt")):
        assert "token-view" in data_records.masked_view(path, *picked, data_records.DEFAULT_TEMPLATE)
    assert parsed == ["pairs.jsonl"]
    f.write_text('{"prompt": "new", "response": "file"}\n{"prompt": "b", "response": "c"}\n', "utf-8")
    data_records.masked_view(path, "prompt", "response", "", data_records.DEFAULT_TEMPLATE)
    assert parsed == ["pairs.jsonl", "pairs.jsonl"]  # a changed file is read again
