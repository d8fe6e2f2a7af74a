"""The bad-input matrix: text, settings, adapters and names, each through the studio's handlers (and the
CLI where it takes the same input). Every case must give a clear message and change nothing: the
datasets folder, the library, the loaded adapters, the base weights and the training runner are
compared before and after.

The core-level checks of each malformed adapter file are in test_adapter_validation.py; here the same
files arrive the way a user sends them, through the Library tab's upload handler.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

import core.train.data
from adapter_helpers import lora_tensors, write_adapter
from conftest import MEDIUM_SHAPED
from core.adapters.format import CONFIG, WEIGHTS
from core.adapters.validate import AdapterError
from core.lora.config import LoraConfig
from core.model.config import PRESETS
from core.model.weights import WeightsError
from studio.app import create_studio
from studio.tabs import compare, data, library, train
from studio.tabs.compare import CompareForm
from bad_adapters import CONFIG_CASES, LC, RAW_CASES, TENSOR_CASES, good
from cli_helpers import cli, one_line_error
from studio_helpers import FAST, _form, _prepare, _start, _train, refused

PNG = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15\xc4\x89"
       b"\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")


def _zip_bytes() -> bytes:
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("story.txt", "Once upon a time " * 50)
    return buf.getvalue()


# ---- text ------------------------------------------------------------------------------------

TEXT_CASES = {  # name: (file bytes, where it is refused: 'upload' or 'prepare', message)
    "empty": (b"", "prepare", r"notes\.txt is empty; give some text"),
    "whitespace only": (b"  \n\t\r\n   \n", "prepare", r"notes\.txt is empty; give some text"),
    "PNG bytes": (PNG, "upload", r"looks like a binary file, not text"),
    "invalid UTF-8": (b"good start \xff\xfe\xfd then junk", "upload",
                      r"is not UTF-8 text \(undecodable byte at offset 11\)"),
    "Latin-1": ("café crème, naïve façade".encode("latin-1"), "upload", r"is not UTF-8 text"),
    "1 token": (b"hello", "prepare", r"only 1 tokens: too short to split"),
    "zip named .txt": (_zip_bytes(), "upload", r"looks like a binary file"),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_bad_text_through_the_data_tab(studio, tmp_path, case):
    content, where, pattern = TEXT_CASES[case]
    f = tmp_path / "notes.txt"
    f.write_bytes(content)
    session = dict(data.EMPTY)
    if where == "upload":
        refused(studio, ValueError, pattern, data.read_uploads, [str(f)], session)
        return
    session, _ = data.read_uploads([str(f)], session)
    session, stats, _ = data.analyze(session, "", 0.9)
    assert "Too short" in stats  # the statistics already warn before Prepare
    refused(studio, ValueError, pattern, data.prepare, studio, session, "", 0.9, "notes")


def test_text_over_the_size_limit(studio, tmp_path, monkeypatch):
    monkeypatch.setattr(core.train.data, "MAX_TEXT_BYTES", 1000)  # the real limit is 256 MiB
    f = tmp_path / "big.txt"
    f.write_text("word " * 400, "utf-8")
    refused(studio, ValueError, r"big\.txt is larger than 0 MiB; use a smaller part", data.read_uploads, [str(f)])
    # the server refuses an upload over --max-file-size before any handler runs: test_server_security.py


def test_pasted_whitespace_and_empty_sessions(studio):
    refused(studio, ValueError, r"add some text first", data.prepare, studio, dict(data.EMPTY), " \n\t ", 0.9, "x")
    refused(studio, ValueError, r"add some text first", data.prepare, studio, None, None, 0.9, "x")


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_bad_text_through_the_cli(tmp_path, capsys, case):
    content, _, pattern = TEXT_CASES[case]
    (tmp_path / "notes.txt").write_bytes(content)
    err = one_line_error(capsys, ["prepare", "--input", tmp_path / "notes.txt", "--output", tmp_path / "ds"])
    assert "notes.txt" in err or "tokens" in err, err
    assert not (tmp_path / "ds").exists()


def test_text_over_the_size_limit_through_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(core.train.data, "MAX_TEXT_BYTES", 1000)
    (tmp_path / "big.txt").write_text("word " * 400, "utf-8")
    assert "larger than" in one_line_error(capsys, ["prepare", "--input", tmp_path / "big.txt", "--output",
                                                    tmp_path / "ds"])
    assert not (tmp_path / "ds").exists()


def test_non_utf8_text_in_a_real_cli_process(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    r = cli("prepare", "--input", "latin.txt", "--output", "ds", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: latin.txt is not UTF-8 text") and not (tmp_path / "ds").exists()


# ---- training settings -------------------------------------------------------------------------

SETTING_CASES = {  # name: (overrides of the Train tab's values, message)
    "rank 0": (dict(r=0), r"rank must be a whole number from 1 to 256 \(got 0\)"),
    "rank negative": (dict(r=-4), r"rank must be a whole number from 1 to 256 \(got -4\)"),
    "rank above the width": (dict(r=100), r"rank 100 is larger than the model width 64"),
    "rank not whole": (dict(r=2.5), r"rank must be a whole number \(got 2\.5\)"),
    "alpha 0": (dict(alpha=0), r"alpha must be a positive number \(got 0\.0\)"),
    "alpha empty": (dict(alpha=None), r"alpha must be a positive number"),
    "lr 0": (dict(lr=0), r"learning rate must be a number > 0"),
    "lr negative": (dict(lr=-1e-3), r"learning rate must be a number > 0"),
    "lr NaN": (dict(lr=float("nan")), r"learning rate must be a finite number \(got nan\)"),
    "lr empty": (dict(lr=None), r"learning rate is empty"),
    "steps 0": (dict(steps=0), r"steps must be a whole number from 1"),
    "steps empty": (dict(steps=None), r"steps is empty"),
    "batch 0": (dict(batch=0), r"batch size must be a whole number from 1"),
    "accumulation 0": (dict(accum=0), r"gradient accumulation steps must be a whole number from 1"),
    "seq len over 1024": (dict(seq_len=2048), r"sequence length must be a whole number from 1 to 1024 \(got 2048\)"),
    "seq len 0": (dict(seq_len=0), r"sequence length must be a whole number from 1"),
    "dropout 1": (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    "no target module": (dict(targets=[]), r"choose at least one target module"),
    "unknown target module": (dict(targets=["attn.c_attn", "q_proj"]), r"unknown target module 'q_proj'"),
    "unknown model": (dict(model="gpt-17"), r"unknown base model 'gpt-17'; choose one of gpt2"),
    "no dataset": (dict(dataset=None), r"choose a dataset"),
    "missing dataset": (dict(dataset="never-made"), r"no dataset named 'never-made'; prepare it on the Data tab"),
    "dataset name traversal": (dict(dataset="../datasets"), r"invalid dataset name '\.\./datasets'"),
}


def _start_with(studio, over):
    a = {**FAST, "model": "tiny", "dataset": "pirates", "steps": 5, **over}
    return train.start(studio, _form(name="new-run", **a))


@pytest.mark.parametrize("case", list(SETTING_CASES))
def test_bad_settings_through_the_train_tab(studio, case):
    over, pattern = SETTING_CASES[case]
    _prepare(studio)
    assert studio.engine.model is None
    refused(studio, (ValueError, FileNotFoundError), pattern, _start_with, studio, over)
    assert studio.engine.model is None  # explained before any base model was loaded
    assert not (studio.library.root / "new-run").exists()


def test_bad_settings_do_not_disturb_a_loaded_model_or_its_adapters(studio):
    _prepare(studio)
    _train(studio, "kept", 3)
    studio.engine.load("kept")
    for over, pattern in [SETTING_CASES["rank above the width"], SETTING_CASES["lr NaN"],
                          SETTING_CASES["seq len over 1024"]]:
        refused(studio, ValueError, pattern, _start_with, studio, over)


def test_sequence_longer_than_the_data_trains_with_a_note(studio):
    data.prepare(studio, dict(data.EMPTY), "a few words of text, " * 12, 0.9, "short")
    msg, _ = _start_with(studio, dict(dataset="short", seq_len=512, steps=2))
    snap = studio.runs.wait(120)
    assert snap["state"] == "finished", snap["message"]
    assert any("fewer than one block of 512 + 1; the block size is reduced" in n for n in snap["notes"])
    assert "the block size is reduced" in train.job_html(snap)


def test_weights_that_do_not_exist_or_are_junk(tmp_path, capsys):
    import app
    assert app.main(["--model", "gpt2", "--weights", str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not weights")
    (junk / "random.bin").write_bytes(b"\x00\x01" * 100)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + b"\x00" * 64)
    for folder, pattern in ((junk, r"no weights in .*junk: expected one of model\.safetensors"),
                            (garbage, r"garbage/model\.safetensors could not be read as weights")):
        studio = create_studio(tmp_path / "lib", tmp_path / "ds", "cpu", "gpt2", weights=str(folder))
        assert studio.availability("gpt2")[0] == "available"  # a path that exists: checked when first used
        data.prepare(studio, dict(data.EMPTY), "word " * 400, 0.9, f"d-{folder.name}")
        refused(studio, WeightsError, pattern, studio.base, "gpt2")
        refused(studio, WeightsError, pattern, _start_with, studio, dict(model="gpt2", dataset=f"d-{folder.name}"))
        refused(studio, WeightsError, pattern, compare.compare, studio, CompareForm(model="gpt2", prompt="Hi",
                                                                                    max_tokens=4, seed=1))
        assert studio.engine.model is None


CLI_SETTING_CASES = {  # test_cli.py covers rank 0/-4, lr 0/-1e-3, steps 0, an unknown model and target
    "rank above the width": (["--rank", "100"], "rank 100 is larger than the model width 64"),
    "alpha 0": (["--alpha", "0"], "alpha must be a positive number"),
    "lr NaN": (["--lr", "nan"], "learning rate must be a number > 0"),
    "batch 0": (["--batch-size", "0"], "batch size must be a whole number"),
    "seq len over 1024": (["--seq-len", "2048"], "sequence length must be a whole number from 1 to 1024"),
    "weights missing": (["--weights", "{tmp}/missing"], "missing: no such file or folder"),
    "weights junk folder": (["--weights", "{tmp}/junk"], "no weights in"),
}


@pytest.mark.parametrize("case", list(CLI_SETTING_CASES))
def test_bad_settings_through_the_cli(tmp_path, capsys, case):
    args, expect = CLI_SETTING_CASES[case]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("junk")
    assert core.train.data.prepare(text="word " * 400, output=tmp_path / "ds")
    argv = ["finetune", "--data", tmp_path / "ds", "--model", "tiny", "--library", tmp_path / "lib",
            *[a.format(tmp=tmp_path) for a in args]]
    if args[0] == "--weights":
        argv[argv.index("tiny")] = "gpt2"
    assert expect in one_line_error(capsys, argv)
    assert not (tmp_path / "lib").exists()


# ---- adapters uploaded through the Library tab ---------------------------------------------------

UI_PATTERNS = {  # without a loaded base the upload is checked against the GPT-2 size the adapter records
    "layer out of range": r"layer 5 but its recorded base tiny has 2 layers",
    "base mismatch": r"has shape \[4, 64\], expected \[4, 1024\] .*its recorded base gpt2-medium",
}


def _bad_adapters():
    for case, (make, pattern) in TENSOR_CASES.items():
        yield case, dict(tensors=make(), lcfg=LC, base_id="tiny"), UI_PATTERNS.get(case, pattern)
    for case, (make, pattern) in RAW_CASES.items():
        yield case, dict(tensors={}, lcfg=LC, base_id="tiny", raw=make()), pattern
    for case, (config, pattern) in CONFIG_CASES.items():
        yield case, dict(tensors=good(), config=config), UI_PATTERNS.get(case, pattern)


BAD_ADAPTERS = {case: (kw, pattern) for case, kw, pattern in _bad_adapters()}


def _zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f"my-adapter/{f.name}")
    return out


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_malformed_adapter_uploads_are_refused(studio, tmp_path, case):
    kw, pattern = BAD_ADAPTERS[case]
    folder = write_adapter(tmp_path / "upload", **kw)
    studio.base("tiny")  # a loaded model, so "no adapter was added" is checked too
    pair = [str(folder / WEIGHTS), str(folder / CONFIG)]
    refused(studio, AdapterError, pattern, library.import_upload, studio, pair, "incoming")
    zipped = [str(_zip_folder(folder, tmp_path / "upload.zip"))]
    refused(studio, AdapterError, pattern, library.import_upload, studio, zipped, "incoming")
    assert "incoming" not in library.names(studio)


def test_upload_file_kinds_are_checked(studio, tmp_path):
    folder = write_adapter(tmp_path / "ok", good(), LC, base_id="tiny")
    refused(studio, AdapterError, r"needs its adapter_config\.json", library.import_upload, studio,
            [str(folder / WEIGHTS)], "x")
    refused(studio, ValueError, r"choose a PEFT adapter \.zip", library.import_upload, studio, [], "x")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01")
    refused(studio, AdapterError, r"upload \.safetensors, \.zip or adapter_config\.json files only",
            library.import_upload, studio, [str(tmp_path / "model.onnx")], "x")
    z = _zip_folder(folder, tmp_path / "a.zip")
    refused(studio, AdapterError, r"upload one \.zip on its own", library.import_upload, studio,
            [str(z), str(folder / CONFIG)], "x")
    (tmp_path / "notes.zip").write_bytes(_zip_bytes())
    refused(studio, AdapterError, r"notes\.zip holds no adapter_model\.safetensors", library.import_upload, studio,
            [str(tmp_path / "notes.zip")], "x")
    assert library.import_upload(studio, [str(folder / WEIGHTS), str(folder / CONFIG)], "fine")[1] == "fine"


def test_an_adapter_for_a_different_base_width(studio, tmp_path):
    """Valid adapters of other widths may sit in the library, but never load onto the tiny base."""
    studio.base("tiny")
    medium = write_adapter(tmp_path / "medium", lora_tensors(PRESETS["gpt2-medium"], r=2), LoraConfig(r=2),
                           base_id="gpt2-medium")
    library.import_upload(studio, [str(medium / WEIGHTS), str(medium / CONFIG)], "for-medium")
    wide = write_adapter(tmp_path / "wide", lora_tensors(MEDIUM_SHAPED, r=4), LC)  # records no base
    library.import_upload(studio, [str(wide / WEIGHTS), str(wide / CONFIG)], "width-128")
    assert "for-medium" not in compare.compatible_adapters(studio, "tiny")
    refused(studio, AdapterError, r"made for gpt2-medium \(24 layers, width 1024\) but the loaded base has 2 layers",
            compare.compare, studio, CompareForm(model="tiny", adapters=["for-medium"], prompt="Hi", max_tokens=4,
                                                 seed=1))
    refused(studio, AdapterError, r"has shape \[4, 128\], expected \[4, 64\]",
            compare.compare, studio, CompareForm(model="tiny", adapters=["width-128"], prompt="Hi", max_tokens=4,
                                                 seed=1))
    # a blend of adapters of different widths is refused too
    refused(studio, AdapterError, r"different", library.blend, studio, ["for-medium", "width-128"], "", "mixed")


def test_a_broken_adapter_placed_in_the_library_by_hand(studio, tmp_path):
    """Files that never went through an upload (copied in, damaged on disk) are checked when used."""
    studio.base("tiny")
    make, pattern = TENSOR_CASES["NaN"]
    write_adapter(studio.library.root / "hand-made", make(), LC, base_id="tiny")
    refused(studio, AdapterError, pattern, compare.compare, studio, CompareForm(model="tiny", adapters=["hand-made"],
                                                                                prompt="Hi", max_tokens=4, seed=1))
    refused(studio, AdapterError, pattern, library.merge_export, studio, "hand-made")
    refused(studio, AdapterError, pattern, library.blend, studio, ["hand-made", "hand-made"], "", "b")


# ---- names -------------------------------------------------------------------------------------

BAD_NAMES = {
    "traversal": "../escape", "traversal deep": "../../../etc/passwd", "dot dot": "..", "dot": ".",
    "absolute": "/etc/passwd", "absolute tmp": "/tmp/lora-owned", "subfolder": "a/b", "backslash": "..\\win",
    "windows drive": "C:\\Users", "hidden": ".hidden", "lock file": ".lock", "tmp prefix": ".tmp-x",
    "reserved con": "con", "reserved NUL.txt": "NUL.txt", "reserved com1": "COM1", "reserved lpt9": "lpt9.data",
    "cyrillic a": "pir\u0430tes", "fullwidth": "\uff50irates", "accent": "na\u00efve", "zero width": "name\u200b",
    "fraction slash": "a\u2044b", "space inside": "a b", "empty": "", "1000 characters": "x" * 1000,
    "65 characters": "y" * 65, "null byte": "a\x00b", "newline inside": "a\nb",
}


def test_bad_names_everywhere_a_name_is_typed(studio, tmp_path):
    _prepare(studio)
    _train(studio, "src", 3)
    ckpt = library.details(studio, "src")[2]["value"]
    z = library.export_zip(studio, "src")
    for case, bad in BAD_NAMES.items():
        adapter, dataset = r"invalid adapter name", r"invalid dataset name"
        refused(studio, ValueError, dataset, data.prepare, studio, dict(data.EMPTY), "word " * 300, 0.9, bad)
        refused(studio, AdapterError, adapter, library.rename, studio, "src", bad)
        refused(studio, AdapterError, adapter, library.duplicate, studio, "src", bad)
        refused(studio, AdapterError, adapter, library.restore_checkpoint, studio, "src", ckpt, bad)
        refused(studio, AdapterError, adapter, library.blend, studio, ["src", "src"], "", bad)
        if bad == "":
            continue  # an empty name means 'automatic' for a new run and 'the file's name' for an upload
        refused(studio, AdapterError, adapter, _start, studio, bad, 3)
        refused(studio, AdapterError, adapter, library.import_upload, studio, [z], bad)
        # an existing adapter named by a bad name: never a path outside the library
        refused(studio, AdapterError, adapter, library.delete, studio, bad)
        refused(studio, AdapterError, adapter, library.details, studio, bad)
        refused(studio, AdapterError, adapter, train.resume, studio, bad, 10)
        refused(studio, AdapterError, adapter, compare.compare, studio, CompareForm(model="tiny", adapters=[bad],
                                                                                    prompt="Hi", max_tokens=4, seed=1))
        if len(bad) > 100:
            msg = refused(studio, AdapterError, adapter, library.duplicate, studio, "src", bad)
            assert "(1000 characters)" in msg and len(msg) < 250, msg
    assert sorted(library.names(studio)) == ["src"] and (tmp_path / "lib").is_dir()
    assert not Path("/tmp/lora-owned").exists()


@pytest.mark.parametrize("bad", ["..", ".hidden", "con", "pir\u0430tes", "x" * 1000])
def test_bad_run_names_through_the_cli(tmp_path, capsys, bad):
    assert core.train.data.prepare(text="word " * 400, output=tmp_path / "ds")
    err = one_line_error(capsys, ["finetune", "--data", tmp_path / "ds", "--model", "tiny", "--library",
                                  tmp_path / "lib", "--output", bad])
    assert "invalid adapter name" in err and len(err) < 300
    assert not (tmp_path / "lib").exists()


def test_good_names_still_work(studio):
    _prepare(studio, name="my_data.v2-final")
    _train(studio, "A" + "b" * 63, 2, dataset="my_data.v2-final")  # the longest name: 64 characters
    assert library.rename(studio, "A" + "b" * 63, "console")[1] == "console"  # 'con' is reserved; 'console' is not
    assert library.duplicate(studio, "console", "com10")[1] == "com10"
