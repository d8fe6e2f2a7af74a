"""Data preparation: reading text safely, statistics, the train/val split, the dataset folder, batches."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from core.train import data
from core.model import tokenizer
from core.model.config import EOT_TOKEN


def text_of_tokens(n: int) -> str:
    """A text that GPT-2 encodes as exactly n tokens ('hello' + n-1 times ' world')."""
    text = "hello" + " world" * (n - 1)
    assert len(tokenizer.encode(text)) == n
    return text


# ---- reading text ---------------------------------------------------------------------

def test_binary_file_is_refused_with_its_name(tmp_path):
    f = tmp_path / "photo.txt"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ValueError, match="photo.txt.*binary"):
        data.read_text_file(f)


def test_non_utf8_file_is_refused_with_its_name(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not UTF-8"):
        data.read_text_file(f)


def test_missing_file_empty_text_and_wrong_kind_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.read_text_file(tmp_path / "nope.txt")
    (tmp_path / "empty.md").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty.md is empty"):
        data.prepare([tmp_path / "empty.md"])
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4")
    with pytest.raises(ValueError, match="doc.pdf.*.txt"):
        data.read_text_file(tmp_path / "doc.pdf")
    with pytest.raises(ValueError, match="empty"):
        data.prepare(text="")


def test_newlines_are_normalised_and_documents_joined_with_endoftext(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffone\r\ntwo\rthree".encode())
    (tmp_path / "b.md").write_text("# four\n")
    ds = data.prepare([tmp_path / "a.txt", tmp_path / "b.md"], train_ratio=0.5)
    ids = np.concatenate([ds.train, ds.val]).tolist()
    assert tokenizer.decode(ids) == "one\ntwo\nthree<|endoftext|># four\n"
    assert ids.count(EOT_TOKEN) == 1
    assert ds.meta["sources"] == ["a.txt", "b.md"]


def test_pasted_text_and_files_combine():
    ds = data.prepare(text="pasted words here, and a few more words to split", text_name="paste")
    assert ds.meta["sources"] == ["paste"]
    assert ds.meta["sha256"] == hashlib.sha256(b"pasted words here, and a few more words to split").hexdigest()


# ---- statistics -----------------------------------------------------------------------

def test_statistics_count_characters_tokens_and_frequent_tokens():
    text = "the cat and the dog and the bird"
    s = data.text_stats(text, top=3)
    ids = tokenizer.encode(text)
    assert (s.chars, s.tokens, s.unique_tokens) == (len(text), len(ids), len(set(ids)))
    assert s.tokens_per_char == pytest.approx(len(ids) / len(text), abs=1e-4)
    # most frequent first; ties broken by the lower token id
    assert [(t, n) for _, t, n in s.top_tokens] == [(" the", 2), (" and", 2), ("the", 1)]
    top = dict((t, n) for _, t, n in data.text_stats(text, top=10).top_tokens)
    assert top[" the"] == 2 and top[" and"] == 2 and top[" cat"] == 1


# ---- the split and the folder ---------------------------------------------------------

def test_the_seeds_356_token_example_splits_320_36(tmp_path):
    ds = data.prepare(text=text_of_tokens(356), output=tmp_path / "ds")
    assert (len(ds.train), len(ds.val)) == (320, 36)
    assert (ds.meta["tokens"], ds.meta["train_tokens"], ds.meta["val_tokens"]) == (356, 320, 36)


def test_split_rejects_bad_ratios_and_too_little_text():
    ids = np.arange(100, dtype=np.uint16)
    for ratio in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="train ratio"):
            data.split_tokens(ids, ratio)
    with pytest.raises(ValueError, match="too short"):
        data.split_tokens(np.arange(3, dtype=np.uint16), 0.9)


def test_dataset_folder_round_trip(tmp_path):
    (tmp_path / "in.txt").write_text("Some text to train on. " * 40)
    ds = data.prepare([tmp_path / "in.txt"], tmp_path / "ds", train_ratio=0.8)
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == ["meta.json", "train_00000.npy", "val_00000.npy"]
    train = np.load(tmp_path / "ds" / "train_00000.npy")
    assert train.dtype == np.uint16 and np.array_equal(train, ds.train)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256(("Some text to train on. " * 40).encode()).hexdigest()
    assert meta["train_ratio"] == 0.8 and meta["sources"] == ["in.txt"] and meta["tokenizer"] == "gpt2"
    assert meta["chars"] == 23 * 40 and meta["train_tokens"] + meta["val_tokens"] == meta["tokens"]
    back = data.load_dataset(tmp_path / "ds")
    assert np.array_equal(back.train, ds.train) and np.array_equal(back.val, ds.val)
    assert back.sha256 == meta["sha256"] and back.name == "ds"


def test_reprepared_folder_has_no_stale_shards(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    np.save(out / "train_00001.npy", np.arange(10, dtype=np.uint16))
    data.prepare(text="fresh text " * 20, output=out)
    assert not (out / "train_00001.npy").exists()


def test_folder_in_the_seeds_layout_loads(tmp_path):
    seed = tmp_path / "brainrot_data"
    seed.mkdir()
    np.save(seed / "train_00000.npy", np.arange(200, dtype=np.uint16))
    np.save(seed / "train_00001.npy", np.arange(200, 250, dtype=np.int32))  # more shards, other int dtype
    np.save(seed / "val_00000.npy", np.arange(30, dtype=np.uint16))
    ds = data.load_dataset(seed)
    assert ds.meta == {} and len(ds.train) == 250 and ds.train.dtype == np.uint16
    assert ds.train[-1] == 249 and len(ds.sha256) == 64


def test_bad_dataset_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: no such dataset folder"):
        data.load_dataset(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "train_00000.npy", np.arange(10, dtype=np.uint16))
    with pytest.raises(ValueError, match="val_00000.npy"):
        data.load_dataset(bad)
    np.save(bad / "val_00000.npy", np.array([1, 60000], dtype=np.uint16))
    with pytest.raises(ValueError, match="outside GPT-2's vocabulary"):
        data.load_dataset(bad)
    np.save(bad / "val_00000.npy", np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="not token ids"):
        data.load_dataset(bad)


def test_block_size_shrinks_to_fit_short_data_and_says_so():
    ds = data.Dataset(train=np.arange(60, dtype=np.uint16), val=np.arange(10, dtype=np.uint16))
    assert ds.block_size(128)[0] == 59 and "reduced to 59" in ds.block_size(128)[1]
    assert ds.block_size(32) == (32, None)


# ---- batches --------------------------------------------------------------------------

def test_batches_are_shifted_windows_and_deterministic_under_a_seed():
    ids = np.arange(1000, dtype=np.uint16)
    x, y = data.get_batch(ids, 4, 16, np.random.default_rng(7))
    x2, y2 = data.get_batch(ids, 4, 16, np.random.default_rng(7))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == __import__("torch").int64
    assert (x == x2).all() and (y == y2).all()
    assert (y[:, :-1] == x[:, 1:]).all() and (y[:, -1] == x[:, -1] + 1).all()  # contiguous windows
    x3, _ = data.get_batch(ids, 4, 16, np.random.default_rng(8))
    assert not (x3 == x).all()


def test_batches_reach_both_ends_of_a_short_split():
    ids = np.arange(20, dtype=np.uint16)
    rng = np.random.default_rng(0)
    starts = {int(data.get_batch(ids, 8, 19, rng)[0][i, 0]) for _ in range(5) for i in range(8)}
    assert starts == {0}  # a split of exactly seq_len + 1 tokens has one window
    starts = {int(data.get_batch(ids, 8, 10, rng)[0][i, 0]) for _ in range(20) for i in range(8)}
    assert starts == set(range(10))


def test_eval_windows_cover_every_token_once_or_sample_evenly():
    ids = np.arange(100, dtype=np.uint16)
    wins = data.eval_windows(ids, 32)
    targets = np.concatenate([w[1:] for w in wins])
    assert np.array_equal(targets, ids[1:])  # each token after the first is predicted exactly once
    assert max(len(w) for w in wins) == 33
    sampled = data.eval_windows(np.arange(10_000, dtype=np.uint16), 32, max_windows=5)
    assert len(sampled) == 5 and sampled[0][0] == 0 and sampled[-1][-1] == 9999
    again = data.eval_windows(np.arange(10_000, dtype=np.uint16), 32, max_windows=5)
    assert all(np.array_equal(a, b) for a, b in zip(sampled, again))  # a fixed sample, not a random one


# ---- bundled samples ------------------------------------------------------------------

def test_bundled_samples_are_short_distinct_texts():
    samples = {s["name"]: s for s in data.list_samples()}
    assert len(samples) >= 2 and "brainrot" in samples
    for s in samples.values():
        assert 2_000 <= s["bytes"] <= 6_000, s
    assert "griddy" in data.load_sample("brainrot") and "Ohio" in data.load_sample("brainrot")
    others = [n for n in samples if n != "brainrot"]
    assert all("griddy" not in data.load_sample(n) for n in others)
    with pytest.raises(ValueError, match="no sample named"):
        data.load_sample("../secret")
