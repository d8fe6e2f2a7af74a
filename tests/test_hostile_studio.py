"""Issue 10, the studio's handlers against a hostile user: invalid Unicode in every text input, sign-in rules
for other users' runs, size caps per session, the download folder's lifetime, values an API client can send
that a browser would not, and messages that keep the user's file names as they were written.

Each case is refused with one clear message and changes nothing (`refused` from test_bad_inputs compares
the datasets, the library, the loaded adapters and the runner before and after).
"""
from __future__ import annotations

import json
import os
import time
import zipfile

import gradio as gr
import pytest

from core.adapters.validate import AdapterError
from core.checks import MAX_PROMPT_CHARS
from core.checks import check_text, is_real, is_text, is_whole, scrub
from studio import context
from studio.app import build_ui
from studio.context import friendly
from studio.tabs import compare, data, data_view, library, train
from studio.tabs.compare import CompareForm
from studio_helpers import FAST, _form, _prepare, _start, _train, _wait_for, refused, unchanged

SURROGATE = "Ahoy \ud800 matey"


def _encodes(value) -> bool:
    """What a page receives must encode as UTF-8 (Gradio's JSON does exactly this)."""
    json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    return True


# ---- 3. invalid Unicode --------------------------------------------------------------------------

def test_check_text_refuses_what_a_page_cannot_show():
    assert check_text("plain text", "x") == "plain text" and check_text(None, "x") == ""
    with pytest.raises(ValueError, match=r"the prompt holds invalid Unicode \(a lone surrogate, U\+D800\) at "
                                         r"character 6; remove that character"):
        check_text(SURROGATE, "the prompt")
    with pytest.raises(ValueError, match=r"the prompt must be text, not bytes"):
        check_text(b"bytes", "the prompt")
    with pytest.raises(ValueError, match=r"the prompt is 11 characters long; the limit is 10\. Shorten it"):
        check_text("x" * 11, "the prompt", 10)
    assert scrub(SURROGATE) == "Ahoy \ufffd matey" and _encodes(scrub(SURROGATE))


def test_the_number_and_text_predicates_refuse_what_json_and_clients_can_send():
    assert is_whole(3, 1, 3) and is_whole(-2) and not any(is_whole(v, 0, 10) for v in (True, 2.0, "2", None, 11, -1))
    assert is_real(0.5, 0, 1) and is_real(2, 0, 10)
    assert not any(is_real(v) for v in (True, float("nan"), float("inf"), 10**400, "1", None))
    assert is_text("ok", 2) and not any(is_text(v, 10) for v in (SURROGATE, "x" * 11, b"bytes", None))


def test_lone_surrogates_are_refused_in_every_text_input(studio, tmp_path):
    _prepare(studio)
    _train(studio, "src", 3)
    ckpt = library.details(studio, "src")[2]["value"]
    z = library.export_zip(studio, "src")
    bad = r"invalid Unicode \(a lone surrogate"
    refused(studio, ValueError, bad, _start, studio, "run", 3, prompt=SURROGATE)  # broke every Train tab
    refused(studio, ValueError, bad, _start, studio, SURROGATE, 3)
    refused(studio, ValueError, bad, _start, studio, "run", 3, dataset=SURROGATE)
    refused(studio, ValueError, bad, compare.compare, studio, CompareForm(model="tiny", prompt=SURROGATE, max_tokens=4,
                                                                          seed=1))
    refused(studio, ValueError, bad, compare.compare, studio, CompareForm(model="tiny", adapters=[SURROGATE],
                                                                          prompt="Hi", max_tokens=4, seed=1))
    refused(studio, ValueError, bad, data.analyze, dict(data.EMPTY), SURROGATE, 0.9)
    refused(studio, ValueError, bad, data.prepare, studio, dict(data.EMPTY), "word " * 300 + SURROGATE, 0.9, "d")
    refused(studio, ValueError, bad, data.prepare, studio, dict(data.EMPTY), "word " * 300, 0.9, SURROGATE)
    refused(studio, ValueError, bad, data.sample_text, SURROGATE)
    refused(studio, ValueError, bad, library.rename, studio, "src", SURROGATE)
    refused(studio, ValueError, bad, library.rename, studio, SURROGATE, "new")
    refused(studio, ValueError, bad, library.duplicate, studio, "src", SURROGATE)
    refused(studio, ValueError, bad, library.restore_checkpoint, studio, "src", SURROGATE, "new")
    refused(studio, ValueError, bad, library.restore_checkpoint, studio, "src", ckpt, SURROGATE)
    refused(studio, ValueError, bad, library.blend, studio, ["src", "src"], "0.5, " + SURROGATE, "b")
    refused(studio, ValueError, bad, library.blend, studio, ["src", SURROGATE], "", "b")
    refused(studio, ValueError, bad, library.import_upload, studio, [z], SURROGATE)
    refused(studio, ValueError, bad, library.details, studio, SURROGATE)
    refused(studio, ValueError, bad, train.resume, studio, SURROGATE, 10)


def test_nothing_the_live_view_sends_can_hold_a_lone_surrogate(studio):
    _prepare(studio)
    _train(studio, "src", 3)
    job = studio.runs.job  # whatever a future trainer reports (a note, a sample) reaches every page
    job.on_event({"type": "info", "message": "note " + SURROGATE})
    job.on_event({"type": "sample", "step": 3, "samples": [{"prompt": "p", "text": SURROGATE}]})
    job_html, _, samples_html = train.live_view(studio, None)[:3]
    assert _encodes([job_html, samples_html]) and "\ufffd" in job_html and "\ufffd" in samples_html


def test_library_pages_show_stored_metadata_with_a_lone_surrogate(studio):
    _prepare(studio)
    _train(studio, "src", 3)
    meta_path = studio.library.root / "src" / "studio.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "user": "\ud800 student", "dataset": "\udfff"}))  # JSON escapes
    rows = library.table_rows(studio)
    md, _, _ = library.details(studio, "src")
    assert _encodes(rows) and _encodes(md)
    assert rows[0][0] == "src" and "unreadable" in rows[0] and "not valid UTF-8" in md  # listed, with its reason


def test_a_warning_never_carries_a_lone_surrogate():
    @friendly
    def echo():
        raise ValueError("no such file: " + SURROGATE)

    with pytest.warns(UserWarning) as warned:
        echo()
    assert _encodes(str(warned[0].message)) and "\ufffd" in str(warned[0].message)


# ---- 14. messages keep file names ----------------------------------------------------------------

def test_warnings_keep_the_users_file_and_adapter_names():
    for text, shown in (("many.zip holds two files named adapter_config.json", "many.zip holds"),
                        ("x-1 is being trained right now", "x-1 is being"),
                        ("'src' belongs to ann", "'src' belongs"),
                        ("select an adapter first.", "Select an adapter first.")):
        @friendly
        def fail(t=text):
            raise ValueError(t)

        with pytest.warns(UserWarning) as warned:
            fail()
        assert str(warned[0].message).startswith(shown), warned[0].message


# ---- 4. sign-in: owners (or admins) only ------------------------------------------------------------

@pytest.fixture
def signed_in(studio):
    """A studio with sign-in, admin 'root', and run 'anns' of ann stopped at step 3 of 4."""
    _prepare(studio)
    studio.auth, studio.admins = True, frozenset({"root"})
    _train(studio, "anns", 3, user="ann")
    return studio


def test_only_the_owner_or_an_admin_may_resume_rename_or_delete(signed_in):
    studio = signed_in
    # ann's run is private: to bob it is not there at all
    hidden = r"no adapter named 'anns' in the library"
    refused(studio, ValueError, hidden, train.resume, studio, "anns", 6, user="bob")
    refused(studio, ValueError, hidden, library.rename, studio, "anns", "bobs", user="bob")
    refused(studio, ValueError, hidden, library.delete, studio, "anns", user="bob")
    # shared with the class, bob sees it, and still may not act on it
    library.share(studio, "anns", True, user="ann")
    who = r"'anns' belongs to ann; only they \(or an admin\) can"
    refused(studio, ValueError, who + " resume it", train.resume, studio, "anns", 6, user="bob")
    refused(studio, ValueError, who + " rename it", library.rename, studio, "anns", "bobs", user="bob")
    refused(studio, ValueError, who + " delete it", library.delete, studio, "anns", user="bob")
    refused(studio, ValueError, who + " delete it", library.delete, studio, "anns", user=None)
    # an admin resumes it; the run stays ann's (in the job and in studio.json), so ann can still stop it
    train.resume(studio, "anns", 6, user="root")
    assert studio.runs.wait(120)["user"] == "ann"
    assert json.loads((studio.library.root / "anns" / "studio.json").read_text())["user"] == "ann"
    assert next(e for e in studio.library.list() if e.name == "anns").user == "ann"
    assert library.rename(studio, "anns", "anns2", user="ann")[1] == "anns2"
    assert library.delete(studio, "anns2", user="root") == "Deleted **anns2**."


def test_a_damaged_entry_stays_its_owners(signed_in):
    # a long sample prompt is a legitimate setting: the entry stays readable and ann's
    studio = signed_in
    _train(studio, "long-prompt", 2, user="ann", prompt="a" * 1500)
    entry = next(e for e in studio.library.list() if e.name == "long-prompt")
    assert entry.problem is None and entry.user == "ann"
    # a field damaged by hand makes the entry unreadable, but not anyone's to take
    meta_path = studio.library.root / "anns" / "studio.json"
    meta_path.write_text(json.dumps({**json.loads(meta_path.read_text()), "steps": "many"}))
    entry = next(e for e in studio.library.list() if e.name == "anns")
    assert entry.status == "unreadable" and entry.user == "ann"
    hidden = r"no adapter named 'anns' in the library"  # ann's, so private: not there for bob
    refused(studio, ValueError, hidden, library.rename, studio, "anns", "bobs", user="bob")
    refused(studio, ValueError, hidden, library.delete, studio, "anns", user="bob")
    assert library.rename(studio, "anns", "anns-damaged", user="root")[1] == "anns-damaged"  # an admin sees it


def test_an_admin_may_stop_anyones_run(signed_in):
    studio = signed_in
    _start(studio, "long", 5000, user="ann")
    assert _wait_for(lambda: studio.runs.snapshot()["state"] == "running")
    job_id = studio.runs.snapshot()["id"]  # the job their pages follow
    with pytest.raises(ValueError, match=r"'long' was started by ann; only they \(or an admin\) can stop it"):
        train.stop(studio, user="bob", job_id=job_id)
    assert "Stopping" in train.stop(studio, user="root", job_id=job_id)
    assert studio.runs.wait(120)["state"] == "stopped"


def test_without_sign_in_everyone_may_act(studio):
    _prepare(studio)
    _train(studio, "anns", 3, user="ann")  # a user name recorded while sign-in was on, then turned off
    assert library.rename(studio, "anns", "open", user="bob")[1] == "open"


def test_what_a_user_creates_records_that_user_and_not_an_uploaded_one(signed_in, tmp_path):
    studio = signed_in
    library.share(studio, "anns", True, user="ann")  # bob may copy it once it is shared; the copies are his
    ckpt = library.details(studio, "anns")[2]["value"]
    library.duplicate(studio, "anns", "dup", user="bob")
    library.restore_checkpoint(studio, "anns", ckpt, "restored", user="bob")
    library.blend(studio, ["anns", "dup"], "0.5, 0.5", "mix", user="bob")
    src = studio.library.root / "anns"
    z = tmp_path / "claims-ann.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            zf.write(src / f, f)
        zf.writestr("studio.json", json.dumps({"user": "ann", "status": "finished"}))
    library.import_upload(studio, [str(z)], "upload", user="bob")
    users = {e.name: e.user for e in studio.library.list()}
    assert [users[n] for n in ("dup", "restored", "mix", "upload")] == ["bob"] * 4 and users["anns"] == "ann"
    assert not any(e.shared for e in studio.library.list() if e.name != "anns")  # a copy starts private


# ---- 5. size caps per session ------------------------------------------------------------------------

def test_pasted_text_and_the_session_total_are_capped(studio, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PASTED_CHARS", 1000)
    monkeypatch.setattr(data, "MAX_SESSION_BYTES", 3000)
    refused(studio, ValueError, r"the pasted text is 1,001 characters long; the limit is 1,000",
            data.prepare, studio, dict(data.EMPTY), "x" * 1001, 0.9, "big")
    refused(studio, ValueError, r"the pasted text is 1,001 characters long", data.analyze, None, "x" * 1001, 0.9)
    files = []
    for i in range(4):  # each file is under every per-file limit; together they are not
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text("word " * 180, "utf-8")  # 900 bytes
    refused(studio, ValueError, r"these files hold 3\.5 KB of text or more; the limit is 2\.9 KB per session\. "
            r"Upload fewer or smaller files", data.read_uploads, [str(f) for f in files])
    state, _ = data.read_uploads([str(f) for f in files[:3]])
    refused(studio, ValueError, r"this session's text \(files and pasted text\) is 3\.0 KB; the limit is 2\.9 KB "
            r"per session\. Remove a file", data.prepare, studio, state, "x" * 400, 0.9, "big")
    assert data.prepare(studio, state, "x" * 200, 0.9, "fits").startswith("✓ Saved dataset **fits**")


def test_a_session_keeps_no_copy_of_its_uploaded_text(studio, tmp_path):
    f = tmp_path / "story.txt"
    f.write_text("Once upon a time " * 5000, "utf-8")  # 85 KB
    state, _ = data.read_uploads([str(f)])
    assert len(repr(state)) < 1000  # where the file is, not what it says
    state, stats, _ = data.analyze(state, "", 0.9)
    assert "story.txt" in stats and state["tokens"] == 20001 and len(repr(state)) < 1000
    assert "Saved dataset **story**" in data.prepare(studio, state, "", 0.9, "story")
    f.unlink()  # the upload cache dropped it (delete_cache): a clear message, not a traceback
    refused(studio, ValueError, r"story\.txt is no longer on the server \(uploads are kept for 1 h\); upload it "
            r"again", data.prepare, studio, state, "", 0.9, "again")


def test_analysis_reads_a_bounded_preview_of_a_big_text(monkeypatch):
    seen = []
    real = data.tokenizer.encode
    monkeypatch.setattr(data.tokenizer, "encode", lambda t: seen.append(len(t)) or real(t))
    monkeypatch.setattr(data, "PREVIEW_CHARS", 10_000)
    state, stats, _ = data.analyze(None, "word " * 20_000, 0.9)  # 100,000 characters
    assert max(seen) <= 10_000 + 40 * data_view.TOKEN_VIEW_LIMIT
    assert "≈ 100,000" in stats and "≈ 20,0" in stats  # characters exact, tokens estimated within 0.1%
    assert "estimate the rest; Prepare counts every token" in stats and abs(state["tokens"] - 20_001) < 20


def test_analysis_never_waits_behind_one_other_session(studio):
    demo = build_ui(studio)
    fns = [f for f in demo.fns.values() if getattr(f.fn, "__wrapped__", None) is data.analyze]
    assert len(fns) == 3 and {(f.concurrency_id, f.concurrency_limit) for f in fns} == {("analyze", 4)}


def test_prompts_are_capped(studio):
    _prepare(studio)
    long = "a" * (MAX_PROMPT_CHARS + 1)
    limit = rf"the prompt is {len(long):,} characters long; the limit is {MAX_PROMPT_CHARS:,}"
    refused(studio, ValueError, limit, compare.compare, studio, CompareForm(model="tiny", prompt=long, max_tokens=4,
                                                                            seed=1))
    refused(studio, ValueError, "the sample " + limit[4:], _start, studio, "run", 3, prompt=long)


# ---- 7. downloads do not pile up ---------------------------------------------------------------------

def test_uploads_and_downloads_leave_gradios_cache(studio):
    assert build_ui(studio).delete_cache == (300, 3600)


def test_downloads_are_dropped_once_handed_over_and_capped(studio):
    _prepare(studio)
    _train(studio, "src", 3)
    z = library.export_zip(studio, "src")
    assert os.path.isfile(z)
    studio.drop_export(z)  # what the event does after Gradio copied the file into its cache
    assert not os.path.exists(z) and list(studio.exports_dir.iterdir()) == []
    stale = studio.export_folder()
    (stale / "old.zip").write_bytes(b"x" * 100)
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    studio.max_export_bytes = 150
    kept = library.export_zip(studio, "src")  # the stale one is swept first
    assert not stale.exists() and os.path.isfile(kept)
    refused(studio, ValueError, r"the server already holds [\d.,]+ KB of downloads being fetched \(the limit is "
            r"150 B\); try again in a few minutes", library.export_zip, studio, "src")


# ---- 12. values a browser would not send -------------------------------------------------------------

NUMBERS = {"steps": (float("inf"), r"steps must be a finite number"),
           "seed": (2**64, r"seed is far too large"),
           "batch": (None, r"batch size is empty; enter a whole number"),
           "alpha": (float("nan"), r"alpha must be a finite number"),
           "lr": ("fast", r"learning rate is empty or not a number"),
           "r": (1e300, r"rank is far too large")}


@pytest.mark.parametrize("ratio", [None, [0.9], float("nan"), "most"])
def test_hostile_split_ratios_in_the_data_tab(studio, ratio):
    text, _, state = data.sample_text("pirate_recipes")
    state, _, _ = data.analyze(state, text, 0.9)
    refused(studio, ValueError, r"the training share (is empty or not a number|must be a finite number)",
            data.prepare, studio, state, text, ratio, "pirates")


@pytest.mark.parametrize("field", list(NUMBERS))
def test_hostile_numbers_in_the_train_tab(studio, field):
    _prepare(studio)
    value, message = NUMBERS[field]
    steps = value if field == "steps" else 3
    over = {} if field == "steps" else {field: value}
    refused(studio, ValueError, message, _start, studio, "run", steps, **over)
    a = {**FAST, **over}
    shown = train.estimate_md(studio, _form(model="tiny", steps=steps, **a))
    assert "⚠" in shown and message.split(" ")[0] in shown
    assert "warn" in train.size_md(studio, "tiny", ["attn.c_attn"], float("inf"))


@pytest.mark.parametrize("args, message", [
    ((None, 50, 1.0, 4, 1), r"temperature is empty or not a number"),
    ((0.8, float("nan"), 1.0, 4, 1), r"top-k is empty"),
    ((0.8, 50, float("inf"), 4, 1), r"top-p must be a finite number"),
    ((0.8, 50, 1.0, 1e300, 1), r"max new tokens is far too large"),
    ((0.8, 50, 1.0, 4, 2**64), r"seed is far too large")])
def test_hostile_numbers_in_the_compare_tab(studio, args, message):
    sampling = dict(zip(("temperature", "top_k", "top_p", "max_tokens", "seed"), args))
    refused(studio, ValueError, message, compare.compare, studio, CompareForm(model="tiny", prompt="Hi", **sampling))


def test_hostile_values_in_lists_and_blend_weights(studio):
    _prepare(studio)
    _train(studio, "src", 3)
    refused(studio, ValueError, r"adapters must be a list", compare.compare, studio,
            CompareForm(model="tiny", adapters="src", prompt="Hi", max_tokens=4, seed=1))
    refused(studio, ValueError, r"unknown base model", compare.compare, studio,
            CompareForm(model=["tiny"], prompt="Hi", max_tokens=4, seed=1))
    refused(studio, ValueError, r"target modules must be a list", _start, studio, "run", 3, targets="attn.c_attn")
    for w in ("nan, 1", "1, inf"):
        refused(studio, ValueError, r"each blend weight must be a finite number", library.blend, studio,
                ["src", "src"], w, "b")
    with unchanged(studio), pytest.warns(UserWarning, match="Invalid adapter name '../etc'"):
        from studio.app import use_in_compare
        friendly(use_in_compare)(studio, "../etc", "tiny", [])


def test_gradios_cache_is_trimmed_oldest_first(studio, tmp_path):
    from studio.app import trim_cache
    demo = build_ui(studio)
    paths = []
    for i in range(4):  # what POST /gradio_api/upload leaves: tracked files, oldest first
        paths.append(tmp_path / f"up{i}.txt")
        paths[-1].write_bytes(b"x" * 1000)
        time.sleep(0.02)
    demo.upload_file_set.update(str(p) for p in paths)
    assert trim_cache(demo, max_bytes=2500) == 2000
    assert [p.exists() for p in paths] == [False, False, True, True]
    assert demo.upload_file_set == {str(p) for p in paths[2:]}
    assert trim_cache(demo, max_bytes=2500) == 0


@pytest.mark.parametrize("meta", [{"training": 5, "blend": 5, "lora": "x", "dataset": 3},
                                  {"training": ["lr"], "blend": [1, "x", {"name": 2}], "lora": [], "history": {}},
                                  {"training": {"lr": {"deep": 1}}, "blend": {"a": 1}, "imported_from": ["x"]}])
def test_details_of_an_entry_with_wrong_types_in_its_metadata(studio, meta):
    _prepare(studio)
    _train(studio, "src", 3)
    (studio.library.root / "src" / "studio.json").write_text(json.dumps(meta))
    md, _, _ = library.details(studio, "src")
    assert "<dl class='kv'>" in md and "Base model" in md and _encodes(md)


def test_saved_datasets_list_survives_odd_metadata(studio):
    _prepare(studio)
    (studio.datasets_dir / "pirates" / "meta.json").write_text(json.dumps({"sources": 5, "tokens": "many"}))
    _prepare(studio, name="second")
    (studio.datasets_dir / "second" / "meta.json").write_text('{"sources": ["\\ud800 notes.txt"], "tokens": 7}')
    md = data_view.saved_datasets_md(studio)
    assert "| pirates | ? |" in md and "| second | 7 |" in md and _encodes(md)  # the bad source name is dropped
