"""The shared engine: one base per process, library adapters hot-swapped on it, per-row routing."""
from __future__ import annotations

import threading

import pytest
import torch

from adapter_helpers import LX, LY, logits, make_adapter
from core.adapters.format import save_adapter
from core.adapters.validate import AdapterError
from core.engine import Engine
from core.generate.sampling import SamplingConfig
from core.lora.layers import adapter_names, add_adapter
from core.model.weights import load_base

GREEDY = SamplingConfig(max_new_tokens=8, temperature=0.0)
PROMPT = "The quick brown fox"


@pytest.fixture
def eng(engine_xy):
    return engine_xy


def _last(it):
    out = None
    for out in it:
        pass
    return out


def _base_tensors(model):
    """Base weights by name; LoRA wrapping moves 'c_attn.weight' to 'c_attn.base.weight'."""
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def _base_snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in _base_tensors(model).items()}


def _assert_base_unchanged(model, snap):
    now = _base_tensors(model)
    assert now.keys() == snap.keys()
    for k, (ptr, val) in snap.items():
        assert now[k].data_ptr() == ptr and torch.equal(now[k], val), k


def test_base_is_loaded_once_and_replaced_by_another(tmp_path, hf_small):
    e = Engine("cpu", tmp_path / "lib")
    with pytest.raises(AdapterError, match="no base model is loaded"):
        e.shared_model()
    said = []
    m = e.base("tiny", progress=said.append)
    assert e.base("tiny") is m and e.shared_model() is m and e.base_id == "tiny"
    m2 = e.base("small", weights=hf_small, progress=said.append)
    assert m2 is not m and e.model is m2 and e.base_id == "small"
    assert any("reading weights" in s for s in said)


def test_hot_swap_keeps_the_base_bit_identical(eng, source):
    model = eng.shared_model()
    snap = _base_snapshot(model)
    x, y = eng.load("x"), eng.load("y")
    assert (x, y) == ("x", "y") and sorted(adapter_names(model)) == ["x", "y"]
    assert torch.equal(logits(model, x), logits(source, "x"))
    assert torch.equal(logits(model, y), logits(source, "y"))
    assert (logits(model, x) - logits(model, None)).abs().max() > 1e-2
    # switching = picking another loaded adapter (its files re-checked); the base is never touched
    # (how long a switch takes: bench/switch.py)
    ids = torch.tensor([[464, 2068]])
    with torch.no_grad():
        for i in range(21):
            model(ids, eng.load("x" if i % 2 else "y"))
    _last(eng.compare(PROMPT, [None, "x", "y"], GREEDY))
    _assert_base_unchanged(model, snap)


def test_compare_rows_match_each_adapter_alone(eng):
    together = _last(eng.compare(PROMPT, [None, "x", "y", "x"], GREEDY))
    alone = [_last(eng.compare(PROMPT, [a], GREEDY))[0] for a in (None, "x", "y")]
    assert together == alone + [alone[1]]
    assert len(set(alone)) == 3  # each adapter really changes the text
    streamed = list(eng.compare(PROMPT, ["x"], GREEDY))
    assert len(streamed) > 1 and streamed[-1] == [alone[1]]


def test_changed_files_are_reloaded_and_running_generations_keep_the_old(eng, source, tmp_path):
    model = eng.shared_model()
    old_text = _last(eng.compare(PROMPT, ["x"], GREEDY))
    running = eng.compare(PROMPT, ["x"], SamplingConfig(max_new_tokens=8, temperature=0.0, stop_at_eot=False))
    first = next(running)  # pins the loaded 'x' while it streams
    other = load_base("tiny", device="cpu")
    make_adapter(other, "x2", LX, seed=9, std=0.3)
    eng.library.delete("x")
    eng.library.save(other, "x2", "x", LX, "tiny")  # same name, new weights
    new = eng.load("x")
    assert new != "x" and sorted(adapter_names(model)) == sorted(["x", new])  # old kept for the stream
    assert eng.load("x") == new  # unchanged files: no reload
    assert torch.equal(logits(model, new), logits(other, "x2"))
    rest = _last(running)
    assert rest[0].startswith(first[0]) and adapter_names(model) == [new]  # finished: old version gone
    assert _last(eng.compare(PROMPT, ["x"], GREEDY)) != old_text


def test_unknown_adapters_fail_before_streaming(eng):
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        eng.compare(PROMPT, [None, "nope"], GREEDY)
    with pytest.raises(AdapterError, match="invalid adapter name"):
        eng.compare(PROMPT, ["../x"], GREEDY)
    with pytest.raises(AdapterError, match="at least one"):
        eng.compare(PROMPT, [], GREEDY)


def test_renamed_adapter_is_dropped(eng):
    model = eng.shared_model()
    eng.load("x")
    eng.library.rename("x", "x_renamed")
    with pytest.raises(AdapterError, match="no adapter named 'x'"):
        eng.load("x")
    assert "x" not in adapter_names(model)
    assert eng.load("x_renamed") == "x_renamed"


def test_concurrent_users_do_not_cross_talk(eng):
    want = {a: _last(eng.compare(PROMPT, [a], GREEDY))[0] for a in (None, "x", "y")}
    got, errors = [], []

    def user(a):
        try:
            for _ in range(3):
                got.append((a, _last(eng.compare(PROMPT, [a], GREEDY))[0]))
        except Exception as e:  # surfaced below
            errors.append(e)
    threads = [threading.Thread(target=user, args=(a,)) for a in (None, "x", "y", "x")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(got) == 12 and all(text == want[a] for a, text in got)


def test_cli_path_and_trainer_adapter(eng, source, tmp_path):
    folder = save_adapter(source, "x", tmp_path / "elsewhere" / "my_adapter", LX, "tiny")
    name = eng.load(str(folder))
    assert name == str(folder.resolve())
    assert eng.load("y") == "y"  # a library name works too
    model = eng.shared_model()
    assert torch.equal(logits(model, name), logits(source, "x"))
    assert _last(eng.compare(PROMPT, [name], GREEDY))[0] == _last(eng.compare(PROMPT, ["x"], GREEDY))[0]
    with eng.lock:  # how the trainer adds its live adapter to the shared model
        add_adapter(model, "train:run1", LY)
    with pytest.raises(AdapterError, match="invalid adapter name 'train:run1'"):  # loaded, yet not a request's
        eng.compare(PROMPT, [name, "train:run1"], GREEDY)  # (tests/test_adapter_lifetime.py)


def test_least_recently_used_adapters_are_evicted(eng, source):
    eng.max_loaded = 2
    eng.library.duplicate("x", "x_copy")
    for n in ("x", "y", "x_copy"):
        eng.load(n)
    assert sorted(eng.loaded()) == ["x_copy", "y"]
    assert sorted(adapter_names(eng.shared_model())) == ["x_copy", "y"]


def test_export_merged_through_the_engine(eng, tmp_path):
    out = eng.export_merged("x", tmp_path / "merged")
    merged = load_base(str(out), device="cpu")
    model = eng.shared_model()
    assert (logits(merged) - logits(model, "x")).abs().max() <= 1e-4


