"""The dataset store (core.train.datasets): names checked, folders published whole, listing defensive."""
from __future__ import annotations

import errno
import json

import pytest

import core.atomic
from core.train.data import build_dataset
from core.train.datasets import DatasetStore, is_dataset_folder


def _ds():
    return build_dataset(["a few words of text to split, " * 20], ["pasted text"])


def test_create_publishes_a_whole_folder_that_records_its_own_name(tmp_path):
    store = DatasetStore(tmp_path / "datasets")
    path = store.create("words", _ds())
    assert path == store.root / "words" and is_dataset_folder(path)
    assert json.loads((path / "meta.json").read_text())["name"] == "words"  # not the hidden build folder's
    assert store.load("words").name == "words"
    assert [p.name for p in store.root.iterdir()] == ["words"]  # no build folder left behind
    assert [d["name"] for d in store.list()] == ["words"]
    with pytest.raises(ValueError, match=r"a dataset named 'words' already exists"):
        store.create("words", _ds())


@pytest.mark.parametrize("bad", ["../x", ".hidden", "a/b", "con", "", "x" * 65])
def test_bad_names_are_refused(tmp_path, bad):
    store = DatasetStore(tmp_path)
    with pytest.raises(ValueError, match=r"invalid dataset name"):
        store.create(bad, _ds())
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    store = DatasetStore(tmp_path)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core.atomic, "write_bytes", full)
    with pytest.raises(OSError, match="No space left"):
        store.create("words", _ds())
    assert list(tmp_path.iterdir()) == []


def test_listing_skips_what_is_not_a_dataset(tmp_path):
    store = DatasetStore(tmp_path)
    store.create("real", _ds())
    (tmp_path / "empty").mkdir()  # no shards
    (tmp_path / ".tmp-real-x").mkdir()  # a build folder
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "meta.json").write_text('{"tokens": "many"}')  # poisoned: listed, counts dropped
    rows = store.list()
    assert [r["name"] for r in rows] == ["real"] and "tokens" not in rows[0]["meta"]
    with pytest.raises(ValueError, match=r"not inside the datasets folder"):
        store.path("link")


def test_find_prefers_the_recorded_folder_then_the_name(tmp_path):
    store = DatasetStore(tmp_path / "store")
    store.create("words", _ds())
    elsewhere = DatasetStore(tmp_path / "cli").create("cli-made", _ds())
    assert store.find(str(elsewhere), "words") == elsewhere
    assert store.find(str(tmp_path / "gone"), "words") == store.root / "words"
    assert store.find(None, "../words") is None and store.find(None, None) is None
