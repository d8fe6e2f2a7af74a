"""What a hostile student can still do to the library, adapter files and datasets' meta (issue 10).

Each case was a crash, a blank error or harm to other users. The library must refuse it with
a one-line message and stay as it was, or list a poisoned entry as 'unreadable' without ever
breaking the listing (every string it returns must be sendable to a page as UTF-8).
"""
from __future__ import annotations

import json
import os
import struct
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from adapter_helpers import listing, lora_tensors, write_adapter
from core.lora.keys import PEFT_PREFIX
from core.adapters.format import CONFIG, META, WEIGHTS, peft_config
from core.adapters.validate import AdapterError
from core.adapters.library import Library
from core.lora.config import LoraConfig
from core.model.config import PRESETS

TINY = PRESETS["tiny"]
LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))
KA = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"


@pytest.fixture
def lib(tmp_path):
    return Library(tmp_path / "lib")


def adapter_folder(folder: Path, meta=None, tensors=None, config=None) -> Path:
    """A valid tiny adapter folder, with `meta` as studio.json (a dict, or raw text)."""
    write_adapter(folder, tensors if tensors is not None else lora_tensors(TINY, r=4), LC, "tiny", config=config)
    if meta is not None:
        (folder / META).write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return folder


def sendable(obj) -> None:
    """What Gradio does with a listing: JSON, encoded as UTF-8 (a lone surrogate fails here)."""
    json.dumps(obj, ensure_ascii=False).encode("utf-8")


@pytest.fixture
def new_york():
    """The server in a UTC-minus time zone: year 9999 overflows datetime.timestamp() there."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


# ---- 1. poisoned metadata: imports keep only known, checked fields ---------------------------------

POISON = {"user": "\ud800 student", "created": "9999-12-31T23:59:59", "status": "complete", "steps": 12,
          "train_loss": 1.5, "evil": "x" * 10, "training": [1, 2], "blend": 7, "name": "\udfff",
          "dataset": {"name": "ok-data", "sha256": "\ud800"}, "history": [{"step": 1, "loss": 2.0}]}


def test_import_keeps_only_known_checked_metadata(lib, tmp_path, new_york):
    src = adapter_folder(tmp_path / "up", POISON)
    lib.import_path(src, "up")
    meta = lib.details("up")["meta"]
    assert "evil" not in meta and "training" not in meta and "blend" not in meta and "name" not in meta
    assert "user" not in meta  # an uploaded user is never believed
    assert meta["created"] != POISON["created"] and meta["steps"] == 12 and meta["train_loss"] == 1.5
    assert "dataset" not in meta and list(lib.history("up")) == [{"step": 1, "loss": 2.0}]  # a bad part drops a field
    [e] = lib.list()
    assert e.status == "imported" and e.problem is None and e.user is None
    sendable([x.to_dict() for x in lib.list()] + [lib.details("up")])


def test_import_records_the_acting_user_only(lib, tmp_path):
    lib.import_path(adapter_folder(tmp_path / "up", {"user": "mallory"}), "mine", user="alice")
    assert lib.details("mine")["meta"]["user"] == "alice" and lib.list()[0].user == "alice"
    lib.duplicate("mine", "copy", user="bob")
    lib.blend(["mine"], [0.5], "half", user="carol")
    assert {e.name: e.user for e in lib.list()} == {"mine": "alice", "copy": "bob", "half": "carol"}
    lib.duplicate("mine", "anon")  # no sign-in: nobody's name is copied along
    assert lib.details("anon")["meta"].get("user") is None


def test_restore_checkpoint_records_the_acting_user(lib, tmp_path):
    adapter_folder(lib.root / "run" / "checkpoints" / "step_000010", {"user": "owner", "steps": 10})
    lib.restore_checkpoint("run", "step_000010", "kept", user="bob")
    assert lib.details("kept")["meta"]["user"] == "bob"


# ---- 1. every entry is read defensively ---------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000
BAD_META = {
    "surrogate user": ({"user": "\ud800 student"}, "not valid UTF-8"),
    "surrogate anywhere": ({"x": {"y": ["\udc80"]}}, "not valid UTF-8"),
    "surrogate key": ({"\ud800": 1}, "not valid UTF-8"),
    "far-future date": ({"created": "9999-12-31T23:59:59"}, "created"),
    "garbage date": ({"created": "yesterday-ish"}, "created"),
    "broken JSON": ('{"steps": ', "not valid JSON"),
    "not an object": ("[1, 2]", "not a JSON object"),
    "training is a list": ({"training": [1]}, "training"),
    "blend is a number": ({"blend": 3}, "blend"),
    "blend items are numbers": ({"blend": [1, 2]}, "blend"),
    "lora is a string": ({"lora": "r=4"}, "lora"),
    "steps is infinite": ('{"steps": Infinity}', "steps"),
    "loss is 1e400": ('{"train_loss": 1e400}', "train_loss"),
    "deep nesting": ('{"x": ' + DEEP + "}", "nested too deeply"),
    "moderate nesting": ('{"x": ' + "[" * 40 + "1" + "]" * 40 + "}", "nested more than"),
}


@pytest.mark.parametrize("case", BAD_META, ids=list(BAD_META))
def test_a_poisoned_entry_is_listed_as_unreadable(lib, case, new_york):
    meta, why = BAD_META[case]
    adapter_folder(lib.root / "poisoned", meta)
    adapter_folder(lib.root / "good", {"status": "complete", "steps": 3})
    entries = {e.name: e for e in lib.list()}
    assert entries["good"].status == "complete" and entries["good"].problem is None
    bad = entries["poisoned"]
    assert bad.status == "unreadable" and why in bad.problem, bad.problem
    d = lib.details("poisoned")
    assert d["meta"] == {} and d["status"] == "unreadable"
    sendable([e.to_dict() for e in lib.list()] + [d, lib.checkpoints("poisoned")])
    lib.delete("poisoned")  # and it can still be removed
    assert lib.names() == ["good"]


def test_a_poisoned_config_or_checkpoint_is_unreadable_not_fatal(lib, new_york):
    cfg = {**peft_config(LC, "tiny"), "task_type": "\ud800", "base_model_name_or_path": "tiny"}
    adapter_folder(lib.root / "badcfg", config=cfg)
    (adapter_folder(lib.root / "deepcfg") / CONFIG).write_text('{"r": ' + DEEP + "}")
    ck = lib.root / "run" / "checkpoints" / "step_000005"
    adapter_folder(ck, {"created": "9999-12-31T23:59:59", "train_loss": "\ud800"})
    entries = {e.name: e for e in lib.list()}
    assert entries["badcfg"].status == "unreadable" and "not valid UTF-8" in entries["badcfg"].problem
    assert entries["deepcfg"].status == "unreadable" and "nested too deeply" in entries["deepcfg"].problem
    assert entries["run"].status == "unreadable" and entries["run"].problem
    [c] = lib.checkpoints("run")
    assert c["step"] == 5 and c["train_loss"] is None
    sendable([e.to_dict() for e in entries.values()] + [lib.details(n) for n in entries] + [c])


def test_far_future_created_never_breaks_the_sort(lib, new_york):
    adapter_folder(lib.root / "future", {"created": "9999-12-31T23:59:59"})
    adapter_folder(lib.root / "now", {})
    assert sorted(lib.names()) == ["future", "now"]


# ---- 1. datasets' meta.json ------------------------------------------------------------------------

def _dataset(folder: Path, meta_text: str) -> Path:
    import numpy as np
    from core.train.data import _npy_bytes
    folder.mkdir(parents=True)
    (folder / "train_00000.npy").write_bytes(_npy_bytes(np.arange(50, dtype=np.uint16)))
    (folder / "val_00000.npy").write_bytes(_npy_bytes(np.arange(10, dtype=np.uint16)))
    (folder / "meta.json").write_text(meta_text)
    return folder


def test_dataset_meta_is_read_defensively(tmp_path, new_york):
    from core.train.data import load_dataset, read_dataset_meta
    poisoned = json.dumps({"tokens": 60, "sources": ["a.txt", "\ud800"], "sha256": "\udfff", "chars": 1e400,
                           "train_ratio": 0.9, "created": "9999-12-31T23:59:59", "evil": [[[[1]]]]})
    d = _dataset(tmp_path / "ds", poisoned)
    meta = read_dataset_meta(d)
    assert meta["tokens"] == 60 and meta["sources"] == ["a.txt"] and meta["train_ratio"] == 0.9
    assert "sha256" not in meta and "chars" not in meta and "created" not in meta and "evil" not in meta
    assert "not valid UTF-8" in meta["problem"]
    sendable(meta)
    ds = load_dataset(d)
    sendable(ds.meta)
    assert len(ds.sha256) == 64  # a digest of the tokens, not the poisoned text
    for text, why in (('{"x": ' + DEEP + "}", "nested too deeply"), ("{", "not valid JSON"), ("7", "JSON object")):
        (d / "meta.json").write_text(text)
        assert why in read_dataset_meta(d)["problem"]


def test_the_studio_lists_poisoned_datasets(tmp_path, new_york):
    from core.engine import Engine
    from studio.context import Studio
    studio = Studio(Engine("cpu", tmp_path / "lib"), tmp_path / "datasets")
    _dataset(studio.datasets_dir / "bad", '{"sources": "\\ud800", "tokens": "many"}')
    _dataset(studio.datasets_dir / "deep", '{"x": ' + DEEP + "}")
    rows = {r["name"]: r for r in studio.datasets()}
    assert set(rows) == {"bad", "deep"} and "tokens" not in rows["bad"]["meta"]
    sendable(list(rows.values()))


# ---- 6. huge work before the size checks -----------------------------------------------------------

def _zip64_claiming(path: Path, entries: int, cd_size: int = 46) -> Path:
    """Only an end-of-central-directory record (zip64) claiming `entries` entries: a few bytes."""
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, entries, entries, cd_size, 0)
    loc = struct.pack("<IIQI", 0x07064B50, 0, 0, 1)
    eocd = struct.pack("<IHHHHIIH", 0x06054B50, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    path.write_bytes(z64 + loc + eocd)
    return path


def test_zip_entry_count_is_read_before_the_directory_is_parsed(lib, tmp_path, monkeypatch):
    def never(*a, **k):
        raise AssertionError("zipfile parsed the central directory")
    monkeypatch.setattr(zipfile, "ZipFile", never)
    before = listing(lib)
    with pytest.raises(AdapterError, match="has 5500000 entries"):
        lib.import_path(_zip64_claiming(tmp_path / "many.zip", 5_500_000), "many")
    with pytest.raises(AdapterError, match="central directory of 300000000 bytes"):
        lib.import_path(_zip64_claiming(tmp_path / "big.zip", 3, cd_size=300_000_000), "big")
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all" * 10)
    with pytest.raises(AdapterError, match="junk.zip is not a readable .zip file"):
        lib.import_path(tmp_path / "junk.zip", "junk")
    assert listing(lib) == before


def test_zip_with_two_members_of_one_name_is_refused(lib, tmp_path):
    src = adapter_folder(tmp_path / "src")
    z = tmp_path / "twice.zip"
    with pytest.warns(UserWarning, match="Duplicate name"):
        with zipfile.ZipFile(z, "w") as zf:
            for f in (WEIGHTS, CONFIG, CONFIG):
                zf.write(src / f, f)
    with pytest.raises(AdapterError, match=f"twice.zip holds two files named {CONFIG}"):
        lib.import_path(z, "twice")
    assert lib.list() == []


def test_zip_total_size_is_capped(lib, tmp_path):
    src = adapter_folder(tmp_path / "src")
    z = tmp_path / "fat.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in (WEIGHTS, CONFIG):
            zf.write(src / f, f)
        for i in range(20):
            zf.writestr(f"junk/{i}.txt", b"\0" * 20_000_000)
    with pytest.raises(AdapterError, match="would unpack to .* bytes in all"):
        lib.import_path(z, "fat")
    assert lib.list() == []


def _raw_safetensors(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def test_safetensors_key_count_and_names_are_checked_on_the_raw_header(lib, tmp_path, monkeypatch):
    import core.adapters.validate as av

    def never(*a, **k):
        raise AssertionError("safetensors parsed the header")
    monkeypatch.setattr(av, "safe_open", never)
    zero = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    cases = {
        "many": ({f"{PEFT_PREFIX}transformer.h.{i}.attn.c_attn.lora_A.weight": zero for i in range(5000)},
                 "holds 5000 tensors"),
        "name": ({"transformer.wte.weight": zero}, "unexpected key 'transformer.wte.weight'"),
        "offsets": ({KA: {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1e400]}}, "data_offsets"),
        "deep": (None, "nested too deeply"),
        "huge": (None, "header claims 2000000 bytes"),
    }
    before = listing(lib)
    for name, (header, why) in cases.items():
        if name == "deep":
            raw = b'{"a": ' + DEEP.encode() + b"}"
            raw = struct.pack("<Q", len(raw)) + raw
        elif name == "huge":
            raw = struct.pack("<Q", 2_000_000) + b"{" + b" " * 2_000_000
        else:
            raw = _raw_safetensors(header)
        folder = write_adapter(tmp_path / name, {}, LC, "tiny", raw=raw)
        t0 = time.perf_counter()
        with pytest.raises(AdapterError, match=why):
            lib.import_path(folder, name)
        assert time.perf_counter() - t0 < 1.0
    assert listing(lib) == before


# ---- 11. finite but huge values ---------------------------------------------------------------------

def test_huge_alpha_and_values_are_refused_on_import(lib, tmp_path):
    before = listing(lib)
    with pytest.raises(AdapterError, match="lora_alpha must be a positive number up to 10000"):
        lib.import_path(adapter_folder(tmp_path / "alpha", config={**peft_config(LC, "tiny"), "lora_alpha": 1e308}))
    t = lora_tensors(TINY, r=4)
    t[KA][0, 0] = 3e38
    with pytest.raises(AdapterError, match=r"values up to 3e\+38, over the limit of 10000"):
        lib.import_path(adapter_folder(tmp_path / "values", tensors=t))
    assert listing(lib) == before


def test_rslora_alpha_is_bounded_as_it_will_be_saved(lib, tmp_path):
    before = listing(lib)
    rs = {**peft_config(LC, "tiny"), "use_rslora": True, "lora_alpha": 9000}  # x sqrt(4) = 18000 once saved
    with pytest.raises(AdapterError, match=r"with use_rslora, lora_alpha x sqrt\(r\) = 18000 is over 10000"):
        lib.import_path(adapter_folder(tmp_path / "rs", config=rs))
    assert listing(lib) == before
    lib.import_path(adapter_folder(tmp_path / "rs-ok", config={**rs, "lora_alpha": 16}), "rs-ok")
    assert next(e for e in lib.list() if e.name == "rs-ok").problem is None  # listed as it was imported


def test_blend_weights_and_results_are_bounded(lib, tmp_path):
    lib.import_path(adapter_folder(tmp_path / "a"), "a")
    t = lora_tensors(TINY, r=4)
    t[PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"][0, 0] = 9000.0
    lib.import_path(adapter_folder(tmp_path / "big", tensors=t), "big")
    before = listing(lib)
    with pytest.raises(AdapterError, match="blend weights must be finite numbers from -100 to 100"):
        lib.blend(["a"], [1e300], "overflow")
    with pytest.raises(AdapterError, match="the blend has values up to .*, over the limit of 10000"):
        lib.blend(["big", "a"], [50, 1], "toolarge")
    assert listing(lib) == before


# ---- 12. no blank errors ----------------------------------------------------------------------------

def test_deep_json_in_adapter_files_is_a_clear_error(lib, tmp_path):
    src = adapter_folder(tmp_path / "deepcfg")
    (src / CONFIG).write_text('{"r": ' + DEEP + "}")
    with pytest.raises(AdapterError, match="adapter_config.json .*nested too deeply"):
        lib.import_path(src, "deepcfg")
    src = adapter_folder(tmp_path / "deepmeta", '{"x": ' + DEEP + "}")
    with pytest.raises(AdapterError, match="studio.json .*nested too deeply"):
        lib.import_path(src, "deepmeta")
    assert lib.list() == []


# ---- 8. runs: a reserved name is held by a live lock, an abandoned empty run folder is swept ----------

def test_a_reserved_run_blocks_its_name_only_while_it_lives(lib, tmp_path):
    hold = lib.reserve_run("run")
    assert (lib.root / "run").is_dir()
    with pytest.raises(AdapterError, match="already exists"):
        lib.import_path(adapter_folder(tmp_path / "x"), "run")
    with pytest.raises(AdapterError, match="already exists"):
        lib.reserve_run("run")
    Library(lib.root)  # a restart elsewhere while the run lives: its folder is kept
    assert (lib.root / "run").is_dir()
    os.close(hold._fd)  # the process died (kill -9): the kernel closes its descriptors, nothing else runs
    assert (lib.root / "run").is_dir()
    Library(lib.root)  # the next start-up
    assert not (lib.root / "run").exists()
    lib.import_path(adapter_folder(tmp_path / "x"), "run")  # the name is free again


def test_a_clean_release_frees_an_empty_run_and_unmarks_a_saved_one(lib):
    lib.reserve_run("failed").release()  # failed before its first checkpoint: the name is free at once
    assert not (lib.root / "failed").exists()
    with lib.reserve_run("saved") as hold:
        adapter_folder(hold.path / "checkpoints" / "step_000001")
    assert (lib.root / "saved").is_dir() and not (lib.root / "saved" / ".run.lock").exists()
    assert lib.list()[0].status == "interrupted (can resume)"


def test_an_unmarked_empty_run_folder_is_swept_at_start_up(lib):
    (lib.root / "crashed" / "checkpoints" / ".step_000010.tmp").mkdir(parents=True)
    old = time.time() - 3600
    os.utime(lib.root / "crashed", (old, old))
    (lib.root / "fresh").mkdir()  # someone may be creating it now: kept until it is stale
    Library(lib.root)
    assert not (lib.root / "crashed").exists() and (lib.root / "fresh").is_dir()


def test_checkpoint_only_runs_are_interrupted_unless_live(lib):
    adapter_folder(lib.root / "run" / "checkpoints" / "step_000010", {"steps": 10})
    [e] = lib.list()
    assert e.status == "interrupted (can resume)"
    assert lib.list(live={"run"})[0].status == "training"
    with lib.hold_run("run"):
        assert lib.list()[0].status == "training"
        with pytest.raises(AdapterError, match="'run' is being trained now"):
            lib.delete("run")
        with pytest.raises(AdapterError, match="'run' is being trained now"):
            lib.rename("run", "other")
        with pytest.raises(AdapterError, match="'run' is being trained now"):
            lib.hold_run("run")
    assert lib.list()[0].status == "interrupted (can resume)"
    lib.rename("run", "other")
    assert lib.names() == ["other"]


# ---- acceptance: the studio builds its page with poisoned entries present ------------------------------

def test_the_studio_page_builds_with_poisoned_library_and_datasets(tmp_path, new_york):
    """What start-up does: build every tab from the library and datasets, and serialise the page
    config (a lone surrogate anywhere in it made Gradio's start-up check fail)."""
    from studio.app import build_ui, create_studio
    lib = tmp_path / "lib"
    for name, meta in (("surrogate", {"user": "\ud800 student"}), ("future", {"created": "9999-12-31T23:59:59"}),
                       ("broken", '{"steps": '), ("types", {"training": [1], "blend": 3, "lora": "x"})):
        adapter_folder(lib / name, meta)
    adapter_folder(lib / "run" / "checkpoints" / "step_000002", {"train_loss": "\udc80"})
    studio = create_studio(lib, tmp_path / "datasets", "cpu", "tiny")
    _dataset(studio.datasets_dir / "poisoned", '{"sources": ["\\ud800"], "tokens": 1e400}')
    entries = {e.name: e for e in studio.library.list()}
    assert {n: e.status for n, e in entries.items()} == dict.fromkeys(
        ("surrogate", "future", "broken", "types", "run"), "unreadable")
    demo = build_ui(studio)
    json.dumps(demo.get_config_file(), ensure_ascii=False, default=str).encode("utf-8")


# ---- 3 and 5 (core part): every text that becomes a dataset is checked -------------------------------

def test_build_dataset_refuses_oversized_and_invalid_text(monkeypatch):
    import core.train.data as data
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 1000)  # the 256 MiB cap, scaled down
    with pytest.raises(ValueError, match=r"pasted text is 1,200 characters long; the limit is 1,000"):
        data.build_dataset(["x" * 1200], ["pasted text"])
    with pytest.raises(ValueError, match=r"the texts together are over the limit of 1000 bytes"):
        data.build_dataset(["x" * 600, "y" * 600], ["a.txt", "b.txt"])
    with pytest.raises(ValueError, match=r"pasted text holds invalid Unicode \(a lone surrogate, U\+D800\) at character 7"):
        data.build_dataset(["hello \ud800 world " * 3], ["pasted text"])
