"""The studio's tab handlers called directly (no browser), on the tiny model: data -> dataset ->
training in the background runner (busy, stop, resume) -> library operations -> compare."""
from __future__ import annotations

import importlib.util
import json
import sys
import threading
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from core.adapters import run_record
from core.adapters.validate import AdapterError
from core.generate.sampling import SamplingConfig, generate_text
from core.lora.layers import adapter_names
from studio.app import build_ui, create_studio
from studio.context import friendly
from studio.models import availability
from studio.plots import curve_figure, loss_figure
from studio.tabs import compare, data, data_view, library, train
from studio.tabs.compare import CompareForm
from studio_helpers import FAST, _form, _prepare, _start, _train, _wait_for

# ---- data ----------------------------------------------------------------------------------

def test_stats_and_token_view(studio):
    text, suggested, state = data.sample_text("shakespearean")
    assert suggested == "shakespearean" and "ACT I" in text
    state, stats, tokens = data.analyze(state, text, 0.8)
    assert "shakespearean.txt (sample)" in stats
    assert "pasted text" in data.analyze(state, text + " edited", 0.8)[1]  # an edited sample is the user's text
    assert state["tokens"] > 500
    assert f"{state['tokens']:,}" in stats and "Unique tokens" in stats and "Most frequent tokens" in stats
    assert tokens.count("class='tok ") == data_view.TOKEN_VIEW_LIMIT
    assert "data-id='" in tokens and "title='id " in tokens


def test_token_view_escapes_html():
    html = data_view.token_view_html("<script>alert('x')</script> & <b>")
    assert "<script" not in html and "<b>" not in html and "&lt;" in html and "&amp;" in html


def test_short_text_warns_and_empty_text_explains():
    _, stats, _ = data.analyze(None, "hello there", 0.9)
    assert "Too short" in stats
    _, stats, tokens = data.analyze(None, "", 0.9)
    assert "Upload" in stats and "Tokens appear here" in tokens


def test_uploads_are_checked_by_content(tmp_path):
    good = tmp_path / "notes.md"
    good.write_text("# Notes\nsome text", "utf-8")
    state, suggested = data.read_uploads([str(good)])
    assert state["files"] == [("notes.md", str(good), good.stat().st_size)] and suggested == "notes"
    assert data.read_uploads([])[1] == gr.skip()  # clearing the files keeps a typed dataset name
    binary = tmp_path / "fake.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    with pytest.raises(ValueError, match="binary"):
        data.read_uploads([str(binary)])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        data.read_uploads([str(latin)])
    with pytest.raises(ValueError, match=r"\.txt and \.md"):
        data.read_uploads([str(tmp_path / "evil.exe")])


def test_prepare_saves_a_named_dataset_selectable_in_train(studio):
    state, _ = data.read_uploads([])
    msg = data.prepare(studio, state, "word" + " word" * 399, 0.9, "words")
    assert "Saved dataset **words**" in msg
    folder = studio.datasets_dir / "words"
    assert (folder / "train_00000.npy").is_file() and json.loads((folder / "meta.json").read_text())["tokens"] == 400
    assert ("words (400 tokens)", "words") in train.dataset_choices(studio)
    assert train.refresh_datasets(studio, select="words")["value"] == "words"
    with pytest.raises(ValueError, match="already exists"):
        data.prepare(studio, state, "word" + " word" * 399, 0.9, "words")
    for bad in ("../escape", ".hidden", "a b", "", "x" * 65):
        with pytest.raises(ValueError, match="invalid dataset name"):
            data.prepare(studio, state, "word" + " word" * 399, 0.9, bad)
    with pytest.raises(ValueError, match="add some text first"):
        data.prepare(studio, state, "   ", 0.9, "empty")


def test_session_uploads_combine_with_pasted_text(studio, tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("alpha " * 100, "utf-8")
    state, _ = data.read_uploads([str(f)])
    state, stats, _ = data.analyze(state, "beta " * 100, 0.9)
    assert "a.txt, pasted text" in stats and "Documents" in stats
    data.prepare(studio, state, "beta " * 100, 0.9, "mixed")
    meta = json.loads((studio.datasets_dir / "mixed" / "meta.json").read_text())
    assert meta["sources"] == ["a.txt", "pasted text"]


# ---- train: estimate, runner, busy, stop, resume -------------------------------------------------

def test_size_and_estimate_update_with_settings(studio):
    one = train.size_md(studio, "gpt2", ["attn.c_attn"], 8)
    assert "294,912" in one and "%" in one  # 12 layers x 8 x (768 + 2304)
    two = train.size_md(studio, "gpt2", ["attn.c_attn", "mlp.c_fc"], 8)
    assert "663,552" in two  # + 12 x 8 x (768 + 3072)
    est = train.estimate_md(studio, train.TrainForm(model="tiny", dropout=0, seed=1))
    assert "peak memory" in est and "200 steps" in est
    bad = train.estimate_md(studio, train.TrainForm(model="tiny", targets=[], dropout=0, seed=1))
    assert "target module" in bad
    assert "noise until" in train.model_status_md(studio, "tiny")


def test_training_runs_in_background_and_lands_in_library(studio):
    _prepare(studio)
    msg, name = _start(studio, "run1", 8, user="alice")
    assert name == "run1" and "Started" in msg
    snap = studio.runs.wait(180)
    assert snap["state"] == "finished", snap["message"]
    assert [p["step"] for p in snap["points"]] == list(range(1, 9))
    assert [e["step"] for e in snap["evals"]] == [0, 5, 8]
    assert snap["samples"] and snap["samples"][-1]["samples"][0]["prompt"] == "Ahoy"
    entry = next(e for e in studio.library.list() if e.name == "run1")
    assert entry.has_final and entry.steps == 8 and entry.user == "alice" and entry.dataset == "pirates"
    meta = json.loads((studio.library.root / "run1" / "studio.json").read_text())
    assert meta["name"] == "run1" and meta["user"] == "alice"
    # the live adapter was removed from the shared model; the library copy loads on demand
    assert _wait_for(lambda: not [n for n in adapter_names(studio.engine.model) if n.startswith("train:")], 10)
    html = train.job_html(snap)
    assert "finished" in html and "step <b>8</b> / 8" in html


def test_one_job_per_user_stop_keeps_adapter_and_resume_continues(studio):
    _prepare(studio)
    _start(studio, "long", 5000, user="bob")
    assert _wait_for(lambda: len(studio.runs.snapshot()["points"]) >= 3)
    # bob's second job is refused by the per-user limit (default 1), naming the job he has
    with pytest.raises(ValueError, match=r"you already have 1 training job queued or running \('long'\); "
                                         r"the limit is 1 per user"):
        _start(studio, "other", 10, user="bob")
    html = train.job_html(studio.runs.snapshot())
    assert "Training" in html and "long" in html and "tokens/s" in html and "ETA" in html
    # the live chart skips a redraw when nothing changed
    first = train.live_view(studio, None)
    # generation keeps working while training runs
    outs = list(compare.compare(studio, CompareForm(model="tiny", prompt="Hello", max_tokens=5, seed=1)))
    assert outs[-1][0].startswith("Hello")
    # stop keeps what was learned
    assert "Stopping" in train.stop(studio)
    assert _wait_for(lambda: studio.runs.snapshot()["state"] == "stopped")  # not joining the thread:
    snap = studio.runs.snapshot()  # a page resumes as soon as it sees 'stopped'
    assert not [n for n in adapter_names(studio.engine.model) if n.startswith("train:")]
    stopped_at = snap["progress"]["step"]
    assert stopped_at >= 3
    entry = next(e for e in studio.library.list() if e.name == "long")
    assert entry.has_final and entry.steps == stopped_at and entry.status == "stopped"
    assert first[5][0] != train.live_view(studio, None)[5][0]  # the job moved on since
    again = train.live_view(studio, None)
    assert train.live_view(studio, again[5]) == (*(gr.skip(),) * 5, again[5])
    # resume continues the stopped run to a new total
    msg, name = train.resume(studio, "long", stopped_at + 4, user="bob")
    assert name == "long" and f"from step {stopped_at}" in msg
    snap = studio.runs.wait(180)
    assert snap["state"] == "finished", snap["message"]
    steps = [p["step"] for p in snap["points"]]
    assert steps == list(range(1, stopped_at + 5))  # history carried over, then continued
    entry = next(e for e in studio.library.list() if e.name == "long")
    assert entry.steps == stopped_at + 4 and entry.status == "finished"
    with pytest.raises(ValueError, match="already reached"):
        train.resume(studio, "long", 1)


def test_stop_is_owner_only_with_auth(studio):
    _prepare(studio)
    studio.auth = True
    _start(studio, "mine", 5000, user="carol")
    assert _wait_for(lambda: studio.runs.snapshot()["state"] == "running")
    job_id = studio.runs.snapshot()["id"]  # the job mallory's page follows
    with pytest.raises(ValueError, match=r"only they \(or an admin\) can stop"):
        train.stop(studio, user="mallory", job_id=job_id)
    assert "No training job of yours" in train.stop(studio, user="mallory")  # and she has none to stop
    assert "Stopping" in train.stop(studio, user="carol")
    assert studio.runs.wait(120)["state"] == "stopped"


def test_bad_settings_are_explained(studio):
    _prepare(studio)
    with pytest.raises(ValueError, match="target module"):
        _start(studio, "x1", 5, targets=[])
    with pytest.raises(ValueError, match="rank"):
        _start(studio, "x2", 5, r=0)
    with pytest.raises(ValueError, match="learning rate"):
        _start(studio, "x3", 5, lr=0)
    with pytest.raises(ValueError, match="choose a dataset"):
        _start(studio, "x4", 5, dataset=None)
    with pytest.raises(ValueError, match="invalid adapter name"):
        _start(studio, "../x", 5)
    with pytest.raises(ValueError, match="unknown base model"):
        studio.base("gpt5")
    assert studio.runs.snapshot() is None


def test_friendly_turns_user_errors_into_warnings():
    @friendly
    def boom():
        raise AdapterError("no adapter named 'x'")

    @friendly
    def gen():
        yield 1
        raise ValueError("bad value")

    @friendly
    def bug():
        raise KeyError("internal")

    with pytest.warns(UserWarning, match="No adapter named"):
        assert boom() == gr.skip()
    g = gen()
    assert next(g) == 1
    with pytest.warns(UserWarning, match="Bad value"):
        assert next(g) == gr.skip()
    with pytest.raises(KeyError, match="internal"):  # a real bug is not dressed up as a user error
        bug()


# ---- library ---------------------------------------------------------------------------------

def test_library_operations(studio, tmp_path):
    _prepare(studio)
    _train(studio, "base-run", 6)
    rows = library.table_rows(studio)
    assert rows[0][0] == "base-run" and rows[0][1] == "tiny" and rows[0][2] == 4
    md, fig, ckpts = library.details(studio, "base-run")
    assert "mlp.c_fc" in md and "pirates" in md
    assert len(fig.data[0].x) == 6 and list(fig.data[1].x) == [0, 5, 6]
    assert ckpts["value"] == "step_000006"

    assert library.duplicate(studio, "base-run", "copy")[1] == "copy"
    assert library.rename(studio, "copy", "renamed")[1] == "renamed"
    with pytest.raises(AdapterError, match="invalid adapter name"):
        library.rename(studio, "renamed", "../../etc")
    with pytest.raises(AdapterError, match="already exists"):
        library.duplicate(studio, "base-run", "renamed")
    assert library.restore_checkpoint(studio, "base-run", "step_000006", "ckpt6")[1] == "ckpt6"

    msg, blended = library.blend(studio, ["base-run", "renamed"], "0.5, 0.5", "mix")
    assert blended == "mix" and "0.5 × base-run" in msg
    with pytest.raises(ValueError, match="one weight per adapter"):
        library.blend(studio, ["base-run", "renamed"], "1", "mix2")

    zpath = Path(library.export_zip(studio, "base-run"))
    with zipfile.ZipFile(zpath) as zf:
        assert {"adapter_model.safetensors", "adapter_config.json", "studio.json"} <= set(zf.namelist())
    assert library.import_upload(studio, [str(zpath)], "from-zip")[1] == "from-zip"
    # a bare .safetensors needs its config; with both it imports
    src = studio.library.root / "base-run"
    with pytest.raises(AdapterError, match="adapter_config.json"):
        library.import_upload(studio, [str(src / "adapter_model.safetensors")], "bare")
    name = library.import_upload(studio, [str(src / "adapter_model.safetensors"), str(src / "adapter_config.json")],
                                 "bare")[1]
    assert name == "bare"
    # pickles and damaged files are refused before anything is written
    evil = tmp_path / "adapter.bin"
    evil.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterError, match=r"adapter\.bin: upload \.safetensors, \.zip or adapter_config\.json files only"):
        library.import_upload(studio, [str(evil)], "evil")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(AdapterError, match=r"broken\.zip is not a readable \.zip file"):
        library.import_upload(studio, [str(broken)], "broken")
    assert "evil" not in library.names(studio) and "broken" not in library.names(studio)

    merged_msg, merged = library.merge_export(studio, "base-run")
    with zipfile.ZipFile(merged) as zf:
        assert {"base-run-merged/config.json", "base-run-merged/model.safetensors"} == set(zf.namelist())
    assert "transformers" in merged_msg

    assert "Deleted" in library.delete(studio, "renamed")
    assert "renamed" not in library.names(studio)
    table, picker, blend_pick = library.refresh(studio, "mix")
    assert picker["value"] == "mix" and {"base-run", "mix", "ckpt6", "from-zip", "bare"} <= set(picker["choices"])


def test_library_refuses_to_touch_a_running_job(studio):
    _prepare(studio)
    _start(studio, "busy-run", 5000)
    assert _wait_for(lambda: studio.runs.snapshot()["state"] == "running")
    with pytest.raises(ValueError, match="being trained"):
        library.delete(studio, "busy-run")
    with pytest.raises(ValueError, match="being trained"):
        library.rename(studio, "busy-run", "x")
    assert "busy-run" not in compare.compatible_adapters(studio, "tiny")
    train.stop(studio)
    studio.runs.wait(120)
    assert "busy-run" in compare.compatible_adapters(studio, "tiny")


def test_a_new_runs_name_is_reserved_before_its_first_checkpoint(studio):
    """Another session cannot claim the name (duplicate, import, blend) while the run has saved nothing."""
    _prepare(studio)
    _train(studio, "other", 2)
    _start(studio, "fresh", 5000)
    with pytest.raises(AdapterError, match="an adapter named 'fresh' already exists"):  # at once: no checkpoint exists yet
        studio.library.duplicate("other", "fresh")
    assert _wait_for(lambda: studio.runs.snapshot()["state"] == "running")  # stopped in the queue, it saves nothing
    train.stop(studio)
    assert studio.runs.wait(120)["state"] in ("stopped", "finished")
    assert studio.library.details("fresh")["meta"].get("duplicated_from") is None


# ---- compare ---------------------------------------------------------------------------------

def _final(gen):
    out = None
    for out in gen:
        pass
    return out


def test_compare_columns_equal_core_generation_with_same_seed(studio):
    _prepare(studio)
    _train(studio, "a1", 6, seed=1)
    _train(studio, "a2", 6, seed=2, lr=5e-3)
    model = studio.engine.model
    prompt, cfg = "Ahoy, the", SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=40, top_p=0.95, seed=99)
    gen = compare.compare(studio, CompareForm(model="tiny", adapters=["a1", "a2"], prompt=prompt, temperature=0.9,
                                              top_k=40, top_p=0.95, max_tokens=12, seed=99))
    first = next(gen)
    assert [u["label"] for u in first[:3]] == ["Base model · tiny", "Adapter · a1", "Adapter · a2"]
    assert [u["visible"] for u in first[:5]] == [True, True, True, False, False]
    final = _final(gen)
    loaded = [None] + [studio.engine.load(n) for n in ("a1", "a2")]
    expected = generate_text(model, prompt, loaded, cfg)
    assert final[:3] == [prompt + t for t in expected]
    assert len(set(final[:3])) == 3  # the adapters make a difference
    assert studio.engine.model is model  # adapters were hot-swapped in; the base was not reloaded
    # each column alone gives the same text as in the batch
    alone = _final(compare.compare(studio, CompareForm(model="tiny", include_base=False, adapters=["a2"], prompt=prompt,
                                                       temperature=0.9, top_k=40, top_p=0.95, max_tokens=12, seed=99)))
    assert alone[0] == final[2]


def test_concurrent_comparisons_do_not_cross_talk(studio):
    _prepare(studio)
    _train(studio, "c1", 6, seed=3)
    _train(studio, "c2", 6, seed=4, lr=5e-3)
    jobs = {"u1": ("c1", "Ahoy"), "u2": ("c2", "Once upon"), "u3": (None, "The galley")}

    def run(adapter, prompt):
        return _final(compare.compare(studio, CompareForm(model="tiny", include_base=adapter is None,
                                                          adapters=[adapter] if adapter else [], prompt=prompt,
                                                          max_tokens=16, seed=5)))[0]

    alone = {k: run(*v) for k, v in jobs.items()}
    together, errors = {}, []

    def worker(k):
        try:
            for _ in range(3):
                together.setdefault(k, set()).add(run(*jobs[k]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in jobs]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert not errors
    assert together == {k: {v} for k, v in alone.items()}


def test_compare_input_errors(studio):
    with pytest.raises(ValueError, match="no adapters for this base yet: train one on the Train tab"):
        next(compare.compare(studio, CompareForm(model="tiny", include_base=False, prompt="x", max_tokens=5, seed=1)))
    with pytest.raises(ValueError, match="at most 4"):
        next(compare.compare(studio, CompareForm(model="tiny", adapters=list("abcde"), prompt="x", max_tokens=5,
                                                 seed=1)))
    with pytest.raises(ValueError, match="prompt"):
        next(compare.compare(studio, CompareForm(model="tiny", prompt="  ", max_tokens=5, seed=1)))
    with pytest.raises(AdapterError, match="no adapter named"):
        next(compare.compare(studio, CompareForm(model="tiny", adapters=["missing"], prompt="x", max_tokens=5, seed=1)))
    with pytest.raises(ValueError, match="top-p"):
        next(compare.compare(studio, CompareForm(model="tiny", prompt="x", top_p=0.0, max_tokens=5, seed=1)))


# ---- models, plots, app wiring ---------------------------------------------------------------

def test_base_model_availability_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    kind, text = availability("gpt2")
    assert kind == "missing" and "not available offline" in text and "--weights" in text and "tiny" in text
    weights = tmp_path / "w"
    weights.mkdir()
    kind, text = availability("gpt2", str(weights), "gpt2")
    assert kind == "available" and "local weights" in text
    assert availability("tiny")[0] == "available"
    monkeypatch.delenv("HF_HUB_OFFLINE")

    class Unknown:
        def reachable(self):
            return None

    kind, text = availability("gpt2-medium", probe=Unknown())
    assert kind == "download" and "1.5 GB" in text


def test_missing_weights_message_says_what_to_do(studio, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from core.model.weights import WeightsError
    with pytest.raises(WeightsError, match="tiny"):
        studio.base("gpt2")
    assert studio.base("tiny") is studio.engine.model  # tiny stays usable


def test_local_weights_must_match_the_model(tmp_path, hf_small):
    studio = create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "gpt2", weights=str(hf_small))
    kind, text = studio.availability("gpt2")
    assert kind == "available" and "local weights" in text
    from core.model.weights import WeightsError
    with pytest.raises(WeightsError, match="2-layer width-64 GPT-2, not gpt2"):
        studio.base("gpt2")


def test_use_in_compare_switches_to_the_adapters_base(studio):
    from studio.app import use_in_compare
    _prepare(studio)
    _train(studio, "for-tiny", 3)
    model, adapters, tabs = use_in_compare(studio, "for-tiny", "gpt2", ["x"])
    assert model == "tiny" and adapters["value"] == ["for-tiny"] and "for-tiny" in adapters["choices"]


def test_plots():
    fig = loss_figure([{"step": 1, "loss": 3.0, "lr": 1e-4}, {"step": 2, "loss": 2.5, "lr": 2e-4}],
                      [{"step": 0, "val_loss": 3.2}, {"step": 2, "val_loss": 2.7}], steps=10)
    assert [t.name for t in fig.data] == ["train loss", "validation loss", "learning rate"]
    assert fig.data[2].yaxis == "y2" and "of 10" in fig.layout.xaxis.title.text
    meta = {"history": [{"step": 1, "loss": 3.0, "lr": 1e-4, "val_loss": 2.9}], "start_val_loss": 3.3,
            "training": {"steps": 4}}
    fig = curve_figure(run_record.curve(None, meta), meta)  # an older studio.json, its history inline
    assert list(fig.data[1].x) == [0, 1]
    assert curve_figure(run_record.curve(None, {"history": "garbage"}), {}).data[0].x == ()


def test_build_ui_and_launch_options(studio):
    from studio.app import launch_options
    demo = build_ui(studio)
    assert demo.studio is studio and set(demo.parts) == {"data", "train", "library", "compare", "evaluate", "arena",
                                                             "teacher", "tabs"}
    opts = launch_options()
    assert opts["enable_monitoring"] is False and opts["max_file_size"] and "allowed_paths" not in opts
    assert "css" in opts and "theme" in opts


def test_app_flags_and_auth(tmp_path):
    import app
    args = app.build_parser().parse_args(["--host", "0.0.0.0", "--port", "7861", "--share", "--model", "tiny",
                                          "--weights", "w", "--library", "L", "--datasets", "D", "--device", "cpu",
                                          "--auth", "u:p"])
    assert (args.host, args.port, args.share, args.model, args.library, args.datasets) == \
        ("0.0.0.0", 7861, True, "tiny", "L", "D")
    assert app.parse_auth("ann:s3cret:x") == [("ann", "s3cret:x")]
    f = tmp_path / "users.txt"
    f.write_text("# team\nann:one\n\nbob:two\n", "utf-8")
    assert app.parse_auth(str(f)) == [("ann", "one"), ("bob", "two")]
    with pytest.raises(ValueError, match="user:password"):
        app.parse_auth("nopassword")
    assert app.main(["--weights", str(tmp_path / "missing"), "--model", "gpt2"]) == 2
    assert app.main(["--weights", str(tmp_path), "--model", "tiny"]) == 2


def test_the_library_overlays_several_adapters_curves_on_one_chart(studio):
    _prepare(studio)
    _train(studio, "slow", 6, lr=1e-3)
    _train(studio, "fast", 4, lr=5e-3, eval_interval=2)
    fig = library.overlay(studio, ["slow", "fast"])
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"slow · train", "slow · validation", "fast · train", "fast · validation"}
    for name in ("slow", "fast"):  # each line is the adapter's own history
        meta = json.loads((studio.library.root / name / "studio.json").read_text())
        history = list(run_record.history(studio.library.root / name))
        steps = [h["step"] for h in history]
        assert list(traces[f"{name} · train"].x) == steps
        assert list(traces[f"{name} · train"].y) == [h["loss"] for h in history]
        vals = [(0, meta["start_val_loss"])] + [(h["step"], h["val_loss"]) for h in history
                                                 if h.get("val_loss") is not None]
        assert list(zip(traces[f"{name} · validation"].x, traces[f"{name} · validation"].y)) == vals
    assert traces["slow · train"].line.color != traces["fast · train"].line.color
    assert library.overlay(studio, []).data == ()
    for bad, msg in ((["slow", "slow"], "each adapter can be chosen once"), (["nope"], "nope"),
                     ([f"x{i}" for i in range(9)], "at most 8 adapters"), ("slow", "choose the adapters")):
        with pytest.raises((ValueError, AdapterError), match=msg):
            library.overlay(studio, bad)


def test_events_do_not_search_the_path_for_a_missing_matplotlib(studio, monkeypatch):
    """Gradio imports matplotlib around every event (each streamed Compare update). Where it is not
    installed, each import searched sys.path again, on the server's event loop. Once the UI is built,
    the import fails at once, as before, but without a search."""
    if sys.modules.get("matplotlib", 0) is not None and importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed here: Gradio's import of it is cached after the first")
    build_ui(studio)
    searched = []

    class Recorder:  # the first finder the import system asks about a module not in sys.modules
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] == "matplotlib":
                searched.append(name)
            return None

    monkeypatch.setattr(sys, "meta_path", [Recorder(), *sys.meta_path])
    from gradio.utils import MatplotlibBackendMananger
    for _ in range(3):
        with MatplotlibBackendMananger():
            pass
    assert searched == []
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401


def test_the_train_tabs_timer_ticks_only_while_that_tab_is_shown(studio):
    """Every open page's Train timer was a queued event each second (17.5 ms of server CPU, whatever the
    page showed): it is off when a page opens, on when the Train tab is selected, off on any other tab;
    and its poll, a quick read, skips the queue's join and event stream."""
    demo = build_ui(studio)
    timer = demo.parts["train"]["timer"]
    assert timer.active is False
    polls = [fn for fn in demo.fns.values() if [(t[0], t[1]) for t in fn.targets] == [(timer._id, "tick")]]
    assert len(polls) == 1 and polls[0].queue is False
    switches = {}
    for fn in demo.fns.values():
        if [o._id for o in fn.outputs] == [timer._id]:
            (tab, event), = [(t[0], t[1]) for t in fn.targets]
            assert event == "select"
            switches[tab] = fn.fn().active
    tabs = {t.elem_id: t._id for t in demo.blocks.values() if isinstance(t, gr.Tab)}
    assert switches == {tabs["tab-train"]: True, **{tabs[f"tab-{n}"]: False for n in
                                                   ("data", "library", "compare", "evaluate", "arena", "teacher")}}


def test_a_system_error_in_a_toast_names_the_file_not_the_servers_folder():
    def handler():
        raise FileNotFoundError(2, "No such file or directory", "/srv/lora-studio/library/run/studio.json")
    with pytest.warns(UserWarning) as toasts:
        friendly(handler)()
    assert [str(t.message) for t in toasts] == ["studio.json: No such file or directory"]
