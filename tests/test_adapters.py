"""The adapter library: save/load round trip, list, rename, delete, duplicate, import, export,
checkpoints, names, crash safety, the writer lock, and exact blends."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter_helpers import listing, logits, make_adapter
from core.adapters.format import CONFIG, META, WEIGHTS, name_from_path, save_adapter
from core.adapters.validate import AdapterError
from core.adapters.library import Library
from core.adapters.export import export_merged, zip_merged
from core.adapters.resolve import AdapterRef, load_adapter, resolve
from core.lora.config import LoraConfig
from core.model.config import PRESETS
from core.lora.layers import adapter_state_dict, lora_layers
from core.model.weights import load_base

TINY = PRESETS["tiny"]
LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"))
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def lib(tmp_path):
    return Library(tmp_path / "lib")


@pytest.fixture
def trained(tiny):
    """The tiny base with adapter 'a' (random non-zero A and B) loaded."""
    make_adapter(tiny, "a", LC, seed=1)
    return tiny


def _weights(lib, name):
    return load_file(str(lib.path(name) / WEIGHTS))


def test_save_then_load_is_bit_identical(lib, trained):
    base = logits(trained, None)
    want = logits(trained, "a")
    assert (want - base).abs().max() > 1e-3  # the adapter changes the output at all
    lib.save(trained, "a", "mine", LC, "tiny", {"steps": 7})
    fresh = load_base("tiny", device="cpu")
    name, lcfg, meta = load_adapter(fresh, lib.path("mine"))
    assert (name, lcfg.r, lcfg.alpha, lcfg.targets) == ("mine", 4, 8.0, LC.targets)
    assert meta["steps"] == 7 and meta["base_model"] == "tiny"
    got, ref = adapter_state_dict(fresh, "mine"), adapter_state_dict(trained, "a")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert torch.equal(logits(fresh, "mine"), want)


def test_list_has_metadata_newest_first(lib, trained):
    lib.save(trained, "a", "old", LC, "tiny", {"created": "2026-01-01T10:00:00+0000", "steps": 3,
                                                "train_loss": 2.5, "val_loss": 2.75, "user": "ann",
                                                "dataset": {"name": "poems.txt", "sha256": "ab"}})
    lib.save(trained, "a", "new", LC, "tiny", {"created": "2026-06-01T10:00:00+0000", "status": "stopped"})
    entries = lib.list()
    assert [e.name for e in entries] == ["new", "old"]
    old = entries[1]
    assert (old.base_model, old.rank, old.alpha, old.targets) == ("tiny", 4, 8.0, list(LC.targets))
    assert (old.steps, old.train_loss, old.val_loss, old.user, old.dataset) == (3, 2.5, 2.75, "ann", "poems.txt")
    assert old.status == "complete" and entries[0].status == "stopped"
    assert old.size_bytes == sum((lib.path("old") / f).stat().st_size for f in (WEIGHTS, CONFIG, META))
    d = lib.details("old")
    assert d["meta"]["dataset"]["sha256"] == "ab" and d["config"]["r"] == 4 and d["checkpoints"] == []


def test_rename(lib, trained):
    lib.save(trained, "a", "one", LC, "tiny")
    lib.save(trained, "a", "two", LC, "tiny")
    w = _weights(lib, "one")
    assert lib.rename("one", "uno") == "uno"
    assert sorted(lib.names()) == ["two", "uno"]
    assert all(torch.equal(w[k], v) for k, v in _weights(lib, "uno").items())
    before = listing(lib)
    with pytest.raises(AdapterError, match="already exists"):
        lib.rename("uno", "two")
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        lib.rename("nope", "x")
    assert listing(lib) == before


def test_delete(lib, trained):
    lib.save(trained, "a", "gone", LC, "tiny")
    lib.save(trained, "a", "kept", LC, "tiny")
    lib.delete("gone")
    assert lib.names() == ["kept"]
    assert [p.name for p in lib.root.iterdir() if p.name != ".lock"] == ["kept"]  # no trash left behind
    with pytest.raises(AdapterError, match="no adapter named 'gone'"):
        lib.delete("gone")


def test_duplicate(lib, trained):
    lib.save(trained, "a", "src", LC, "tiny", {"steps": 5})
    lib.duplicate("src", "copy")
    assert (lib.path("copy") / WEIGHTS).read_bytes() == (lib.path("src") / WEIGHTS).read_bytes()
    d = lib.details("copy")
    assert d["meta"]["duplicated_from"] == "src" and d["steps"] == 5
    with pytest.raises(AdapterError, match="already exists"):
        lib.duplicate("src", "copy")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", "", "x" * 65, ".hidden", "a b", "ok\n", "..", "a\\b"])
def test_bad_names_are_refused(lib, trained, bad, tmp_path):
    lib.save(trained, "a", "fine", LC, "tiny")
    before = listing(lib)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lib.save(trained, "a", bad, LC, "tiny")
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lib.rename("fine", bad)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lib.duplicate("fine", bad)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lib.import_path(lib.path("fine"), bad)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lib.path(bad)
    assert listing(lib) == before
    assert not (tmp_path / "x").exists() and not (tmp_path / "a").exists()


def test_longest_name_is_accepted(lib, trained):
    name = "A" + "b_.-9" * 12 + "xyz"
    assert len(name) == 64
    assert lib.save(trained, "a", name, LC, "tiny") == name


def test_symlinks_are_refused(lib, trained, tmp_path):
    lib.save(trained, "a", "real", LC, "tiny")
    outside = tmp_path / "outside"
    save_adapter(trained, "a", outside, LC, "tiny")
    (lib.root / "linked").symlink_to(outside, target_is_directory=True)
    assert lib.names() == ["real"]
    with pytest.raises(AdapterError, match="symbolic link"):
        lib.path("linked")
    (lib.path("real") / META).unlink()
    (lib.path("real") / META).symlink_to(outside / META)
    with pytest.raises(AdapterError, match="symbolic link"):
        lib.path("real")


def test_import_folder_file_and_zip_round_trip(lib, trained, tmp_path):
    src = save_adapter(trained, "a", tmp_path / "peft_dir", LC, "tiny", {"steps": 9})
    assert lib.import_path(src) == "peft_dir"  # default name: the folder's
    assert lib.details("peft_dir")["steps"] == 9
    assert lib.import_path(src / WEIGHTS, "bare") == "bare"  # .safetensors with the config beside it
    elsewhere = tmp_path / "loose"
    elsewhere.mkdir()
    (elsewhere / "weights.safetensors").write_bytes((src / WEIGHTS).read_bytes())
    assert lib.import_path(elsewhere / "weights.safetensors", "loose", config_path=src / CONFIG) == "loose"

    z = lib.export_zip("peft_dir", tmp_path / "exports")
    assert z.name == "peft_dir.zip"
    assert sorted(zipfile.ZipFile(z).namelist()) == sorted([WEIGHTS, CONFIG, META])
    assert lib.import_path(z, "from_zip", base_cfg=TINY) == "from_zip"
    ref = adapter_state_dict(trained, "a")
    for name in ("peft_dir", "bare", "loose", "from_zip"):
        w = _weights(lib, name)
        assert all(torch.equal(w["base_model.model." + k], v) for k, v in ref.items()), name
    with pytest.raises(AdapterError, match="already exists"):
        lib.export_zip("peft_dir", tmp_path / "exports")
    with pytest.raises(AdapterError, match="already exists"):
        lib.import_path(z, "from_zip")


def test_zip_inside_a_folder_with_readme(lib, trained, tmp_path):
    src = save_adapter(trained, "a", tmp_path / "x", LC, "tiny")
    z = tmp_path / "wrapped.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(src / WEIGHTS, "my-adapter/" + WEIGHTS)
        zf.write(src / CONFIG, "my-adapter/" + CONFIG)
        zf.writestr("my-adapter/README.md", "# card")
        zf.writestr("__MACOSX/my-adapter/._adapter_model.safetensors", "junk")
        zf.writestr("my-adapter/notes.txt", "ignored")
    assert lib.import_path(z) == "wrapped"
    assert sorted(p.name for p in lib.path("wrapped").iterdir()) == [CONFIG, WEIGHTS, META]


def _zip(path, members: dict, symlink: str | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return path


def test_hostile_zips_are_refused(lib, trained, tmp_path):
    src = save_adapter(trained, "a", tmp_path / "x", LC, "tiny")
    ok = {WEIGHTS: (src / WEIGHTS).read_bytes(), CONFIG: (src / CONFIG).read_bytes()}
    cases = {
        "slip.zip": (dict(ok, **{"../evil.txt": "x"}), None, r"unsafe path"),
        "abs.zip": (dict(ok, **{"/tmp/evil.txt": "x"}), None, r"unsafe path"),
        "link.zip": (ok, "link", r"symbolic link"),
        "many.zip": (dict(ok, **{f"f{i}.txt": "x" for i in range(70)}), None, r"has 72 entries"),
        "pickle.zip": (dict(ok, **{"adapter_model.bin": "x"}), None, r"contains adapter_model\.bin: pickle"),
        "two.zip": ({"a/" + k: v for k, v in ok.items()} | {"b/" + k: v for k, v in ok.items()}, None,
                    r"holds several adapters"),
        "empty.zip": ({"README.md": "hi"}, None, r"holds no adapter_model\.safetensors"),
        "bomb.zip": (dict(ok, **{CONFIG: b" " * (17 * 2**20)}), None, r"would unpack to \d+ bytes, over the limit"),
    }
    before = listing(lib)
    for fname, (members, link, pattern) in cases.items():
        with pytest.raises(AdapterError, match=pattern):
            lib.import_path(_zip(tmp_path / fname, members, link), "z")
        assert listing(lib) == before, fname
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(AdapterError, match="not a readable .zip"):
        lib.import_path(tmp_path / "junk.zip", "z")


def test_zip_that_lies_about_its_size(lib, trained, tmp_path, monkeypatch):
    """A member that declares a small size but inflates to more is stopped while inflating."""
    import core.adapters.archive as az
    monkeypatch.setattr(az, "MAX_JSON_BYTES", 1000)
    src = save_adapter(trained, "a", tmp_path / "x", LC, "tiny")
    z = tmp_path / "liar.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(src / WEIGHTS, WEIGHTS)
        zf.writestr(CONFIG, b"{" + b" " * 50_000 + b"}")
    data = bytearray(z.read_bytes())
    # rewrite the declared uncompressed size of adapter_config.json in both zip headers
    for sig, size_at, name_at in ((b"PK\x03\x04", 22, 30), (b"PK\x01\x02", 24, 46)):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            n = int.from_bytes(data[i + size_at + 4:i + size_at + 6], "little")
            if data[i + name_at:i + name_at + n] == CONFIG.encode():
                data[i + size_at:i + size_at + 4] = (20).to_bytes(4, "little")
            start = i + 4
    z.write_bytes(bytes(data))
    assert zipfile.ZipFile(z).getinfo(CONFIG).file_size == 20
    with pytest.raises(AdapterError, match=r"adapter_config\.json (could not be unpacked|unpacks to more than)"):
        lib.import_path(z, "liar")
    assert lib.list() == []


def test_checkpoints_belong_to_their_run(lib, trained):
    run = lib.root / "run1"
    for step, loss in ((50, 3.0), (100, 2.0)):
        ck = save_adapter(trained, "a", run / "checkpoints" / f"step_{step:06d}", LC, "tiny",
                          {"steps": step, "train_loss": loss, "status": "finished"})
        (ck / "trainer_state.pt").write_bytes(b"\x80\x02 trainer's own pickle, never read")
    (run / "checkpoints" / "step_000150").mkdir()  # being written: incomplete, not offered
    [entry] = lib.list()
    assert (entry.name, entry.has_final, entry.n_checkpoints, entry.rank) == ("run1", False, 2, 4)
    assert entry.status == "interrupted (can resume)" and entry.steps == 100  # no live process holds it
    assert [c["name"] for c in lib.details("run1")["checkpoints"]] == ["step_000050", "step_000100"]
    cks = lib.checkpoints("run1")
    assert [(c["name"], c["step"], c["train_loss"], c["spec"]) for c in cks] == [
        ("step_000050", 50, 3.0, "run1@step_000050"), ("step_000100", 100, 2.0, "run1@step_000100")]
    assert all(c["size_bytes"] < 100_000 for c in cks)  # adapter files only
    fresh = load_base("tiny", device="cpu")
    load_adapter(fresh, lib.path("run1@step_000050"), "ck")
    assert torch.equal(logits(fresh, "ck"), logits(trained, "a"))
    lib.restore_checkpoint("run1", "step_000050", "restored")
    assert sorted(p.name for p in lib.path("restored").iterdir()) == [CONFIG, WEIGHTS, META]
    assert lib.details("restored")["meta"]["restored_from"] == "run1@step_000050"
    with pytest.raises(AdapterError, match="no final adapter yet"):
        lib.duplicate("run1", "dup")
    save_adapter(trained, "a", run, LC, "tiny", {"steps": 120, "status": "complete"})
    e = next(e for e in lib.list() if e.name == "run1")
    assert (e.has_final, e.steps, e.n_checkpoints) == (True, 120, 2)
    assert "run1" in lib.names() and "checkpoints" not in lib.names()
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lib.path("run1@../../x")


def test_unreadable_config_is_listed_as_unreadable_and_deletable(lib, trained):
    lib.save(trained, "a", "broken", LC, "tiny")
    (lib.path("broken") / CONFIG).write_text("{")
    [e] = lib.list()
    assert e.status == "unreadable" and "not valid JSON" in e.problem
    lib.delete("broken")
    assert lib.list() == []


def test_failed_write_leaves_library_unchanged(lib, trained, monkeypatch):
    lib.save(trained, "a", "before", LC, "tiny")
    before = listing(lib)
    import core.adapters.library as al

    def boom(*a, **k):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(al.os, "rename", boom)
    with pytest.raises(OSError, match="injected"):
        lib.save(trained, "a", "after", LC, "tiny")
    monkeypatch.undo()
    assert listing(lib) == before and lib.names() == ["before"]


CRASH = """
import os, sys
sys.path.insert(0, {root!r})
import torch
from core.model.weights import load_base
from core.lora.config import LoraConfig
from core.lora.layers import add_adapter
import core.adapters.library as al
model = load_base("tiny", device="cpu")
lc = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))
add_adapter(model, "a", lc)
al.os.rename = lambda *a: os._exit(3)   # the process dies between writing and renaming
al.Library({lib!r}).save(model, "a", "half", lc, "tiny")
"""


def test_crash_between_write_and_rename(lib, trained):
    lib.save(trained, "a", "kept", LC, "tiny")
    proc = subprocess.run([sys.executable, "-c", CRASH.format(root=str(ROOT), lib=str(lib.root))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    leftovers = [p for p in lib.root.iterdir() if p.name.startswith(".tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / WEIGHTS).is_file()  # the crash left a built folder
    assert lib.names() == ["kept"]  # ... that is not listed
    old = os.path.getmtime(leftovers[0]) - 2 * 3600
    os.utime(leftovers[0], (old, old))
    Library(lib.root)  # the next start sweeps stale leftovers
    assert not leftovers[0].exists() and lib.names() == ["kept"]


def test_concurrent_writers_are_serialised(lib, trained, tmp_path):
    src = save_adapter(trained, "a", tmp_path / "src", LC, "tiny")
    results, errors = [], []

    def worker(name):
        try:
            results.append(Library(lib.root).import_path(src, name))
        except AdapterError as e:
            errors.append(str(e))
    threads = [threading.Thread(target=worker, args=(n,)) for n in ["same"] * 4 + ["other1", "other2"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["other1", "other2", "same"]
    assert len(errors) == 3 and all("already exists" in e for e in errors)
    assert sorted(lib.names()) == ["other1", "other2", "same"]
    assert not [p for p in lib.root.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_lock_excludes_other_processes(lib):
    """While one process holds the library lock, another cannot take it."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('got')\n"
            "except BlockingIOError:\n    print('blocked')")
    with lib.lock():
        held = subprocess.run([sys.executable, "-c", code, str(lib.root / ".lock")], capture_output=True, text=True)
    free = subprocess.run([sys.executable, "-c", code, str(lib.root / ".lock")], capture_output=True, text=True)
    assert (held.stdout.strip(), free.stdout.strip()) == ("blocked", "got")


def test_resolve(lib, trained, tmp_path):
    lib.save(trained, "a", "named", LC, "tiny")
    folder = save_adapter(trained, "a", tmp_path / "folder", LC, "tiny")
    assert resolve("named", lib.root) == AdapterRef(lib.path("named"), "named")
    assert resolve(str(folder), lib.root) == AdapterRef(folder)
    assert resolve(str(folder / WEIGHTS), lib.root) == AdapterRef(folder / WEIGHTS)
    with pytest.raises(AdapterError, match="no adapter named 'missing'"):
        resolve("missing", lib.root)
    (tmp_path / "lonely.safetensors").write_bytes((folder / WEIGHTS).read_bytes())
    with pytest.raises(AdapterError, match="needs adapter_config.json beside it"):
        resolve(str(tmp_path / "lonely.safetensors"), lib.root)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(AdapterError, match="never loaded"):
        resolve(str(tmp_path / "adapter_model.bin"), lib.root)


def test_load_refuses_a_loaded_name(lib, trained):
    lib.save(trained, "a", "a", LC, "tiny")
    with pytest.raises(AdapterError, match="already loaded"):
        load_adapter(trained, lib.path("a"))


# ---- blending -----------------------------------------------------------------------------

def _deltas(model, name):
    return {p: l.delta(name) for p, l in lora_layers(model).items() if l.has(name)}


def test_blend_is_the_weighted_sum_of_deltas(lib, tiny):
    l1 = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"))
    l2 = LoraConfig(r=2, alpha=5.0, targets=("attn.c_attn", "attn.c_proj", "mlp.c_proj"))
    make_adapter(tiny, "x", l1, seed=1)
    make_adapter(tiny, "y", l2, seed=2)
    lib.save(tiny, "x", "x", l1, "tiny")
    lib.save(tiny, "y", "y", l2, "tiny")
    w = (0.7, -1.3)
    assert lib.blend(["x", "y"], w, "mix", TINY) == "mix"
    e = lib.details("mix")
    assert (e["rank"], e["alpha"], e["meta"]["blend"][1]) == (6, 6.0, {"name": "y", "weight": -1.3})
    assert e["targets"] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # the union
    load_adapter(tiny, lib.path("mix"))
    dx, dy, dm = _deltas(tiny, "x"), _deltas(tiny, "y"), _deltas(tiny, "mix")
    assert set(dm) == set(dx) | set(dy)
    for p in dm:
        want = w[0] * dx.get(p, 0) + w[1] * dy.get(p, 0)
        assert (dm[p] - want).abs().max() <= 1e-5, p
        assert want.abs().max() > 1e-3


def test_blend_with_weights_one_zero_reproduces_the_first(lib, tiny):
    l1 = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))
    l2 = LoraConfig(r=4, alpha=8.0, targets=("mlp.c_fc",))
    make_adapter(tiny, "x", l1, seed=1)
    make_adapter(tiny, "y", l2, seed=2)
    lib.save(tiny, "x", "x", l1, "tiny")
    lib.save(tiny, "y", "y", l2, "tiny")
    lib.blend(["x", "y"], [1, 0], "just_x", TINY)
    load_adapter(tiny, lib.path("just_x"))
    assert (logits(tiny, "x") - logits(tiny, None)).abs().max() > 1e-3
    assert (logits(tiny, "just_x") - logits(tiny, "x")).abs().max() <= 1e-5


def test_blend_refusals(lib, tiny):
    big = LoraConfig(r=60, alpha=8.0, targets=("attn.c_attn",))
    make_adapter(tiny, "big", big)
    lib.save(tiny, "big", "big", big, "tiny")
    before = listing(lib)
    with pytest.raises(AdapterError, match="rank 300 .*over the limit of 256"):
        lib.blend(["big"] * 5, [1] * 5, "huge", TINY)
    with pytest.raises(AdapterError, match="one weight per adapter"):
        lib.blend(["big"], [1, 2], "w", TINY)
    with pytest.raises(AdapterError, match="finite numbers"):
        lib.blend(["big"], [float("nan")], "w", TINY)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        lib.blend(["big"], [1], "../w", TINY)
    assert listing(lib) == before


# ---- merged export (transformers parity lives in test_peft_interop) ---------------------------

def test_export_merged_leaves_the_shared_model_alone(trained, tmp_path):
    before = {k: (v.data_ptr(), v.clone()) for k, v in trained.state_dict().items() if ".lora_" not in k}
    out = export_merged(trained, "a", tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    after = trained.state_dict()
    assert all(after[k].data_ptr() == p and torch.equal(after[k], v) for k, (p, v) in before.items())
    merged = load_base(str(out), device="cpu")  # our own loader reads it back as a base
    assert (logits(merged) - logits(trained, "a")).abs().max() <= 1e-4
    with pytest.raises(AdapterError, match="already exists"):
        export_merged(trained, "a", tmp_path / "merged")
    with pytest.raises(AdapterError, match="no adapter named 'zzz'"):
        export_merged(trained, "zzz", tmp_path / "m2")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]



def test_a_merged_export_zips_into_one_download(trained, tmp_path):
    import zipfile
    out = export_merged(trained, "a", tmp_path / "a-merged")
    weights = (out / "model.safetensors").read_bytes()
    zpath = zip_merged(out)
    assert zpath == tmp_path / "a-merged.zip" and not out.exists()
    with zipfile.ZipFile(zpath) as zf:
        assert sorted(zf.namelist()) == ["a-merged/config.json", "a-merged/model.safetensors"]
        assert zf.getinfo("a-merged/model.safetensors").compress_type == zipfile.ZIP_STORED
        assert zf.read("a-merged/model.safetensors") == weights
        zf.extractall(tmp_path / "unzipped")
    merged = load_base(str(tmp_path / "unzipped" / "a-merged"), device="cpu")
    assert (logits(merged) - logits(trained, "a")).abs().max() <= 1e-4
    again = export_merged(trained, "a", tmp_path / "a-merged")  # its zip is there already: never overwritten
    with pytest.raises(FileExistsError):
        zip_merged(again)
    assert zipfile.ZipFile(zpath).read("a-merged/model.safetensors") == weights
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind

def test_blend_without_a_base_refuses_different_widths(lib, tmp_path):
    from adapter_helpers import lora_tensors, write_adapter
    from conftest import MEDIUM_SHAPED
    lc = LoraConfig(r=4, alpha=8.0, targets=("mlp.c_proj",))
    lib.import_path(write_adapter(tmp_path / "narrow", lora_tensors(TINY, 4, lc.targets), lc), "narrow")
    lib.import_path(write_adapter(tmp_path / "wide", lora_tensors(MEDIUM_SHAPED, 4, lc.targets), lc), "wide")
    lib.blend(["narrow", "narrow"], [1, 1], "same_width")  # fine: one width
    with pytest.raises(AdapterError, match="different widths"):
        lib.blend(["narrow", "wide"], [1, 1], "mixed")
    assert "mixed" not in lib.names()


def test_the_name_a_path_implies(tmp_path):
    """One rule for loading and importing: a folder's name (also for its adapter_model.safetensors),
    else the file's stem."""
    (tmp_path / "run1").mkdir()
    assert name_from_path(tmp_path / "run1") == "run1"
    assert name_from_path(tmp_path / "run1" / WEIGHTS) == "run1"
    assert name_from_path(tmp_path / "pirate.safetensors") == "pirate"
    assert name_from_path(tmp_path / "pirate.zip") == "pirate"
