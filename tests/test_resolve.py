"""One path from an adapter reference to a loaded adapter: the Engine, for the CLI as for the studio."""
from __future__ import annotations

import pytest
import torch

from adapter_helpers import logits, make_adapter
from core.__main__ import main
from core.adapters.format import WEIGHTS, save_adapter
from core.adapters.resolve import AdapterRef, library_entry
from core.adapters.validate import AdapterError
from core.engine import Engine
from core.lora.config import LoraConfig
from core.model.weights import load_base

LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"))


@pytest.fixture
def source():
    m = load_base("tiny", device="cpu")
    make_adapter(m, "x", LC, seed=1, std=0.3)
    return m


def test_a_path_reference_loads_without_creating_a_library(tmp_path, source):
    folder = save_adapter(source, "x", tmp_path / "elsewhere" / "mine", LC, "tiny")
    eng = Engine("cpu", tmp_path / "no-lib")
    eng.base("tiny")
    ref = eng.resolve(str(folder / WEIGHTS))
    assert ref == AdapterRef(folder / WEIGHTS)
    name = eng.load(ref)
    assert eng.load(str(folder / WEIGHTS)) == name  # same files: loaded once
    assert eng.config_of(name) == LC
    assert torch.equal(logits(eng.shared_model(), name), logits(source, "x"))
    assert not (tmp_path / "no-lib").exists()
    assert library_entry("x", tmp_path / "no-lib") is None
    with pytest.raises(AdapterError, match="no adapter named 'zzz' is loaded"):
        eng.config_of("zzz")


def test_a_library_reference_is_loaded_under_its_library_name(tmp_path, source):
    eng = Engine("cpu", tmp_path / "lib")
    eng.library.save(source, "x", "kept", LC, "tiny")
    eng.base("tiny")
    ref = eng.resolve("kept")
    assert ref == AdapterRef(eng.library.path("kept"), "kept")
    assert eng.load(ref) == "kept" and eng.loaded() == {"kept": "kept"}
    assert eng.config_of("kept").r == 4


def test_cli_merge_goes_through_the_engine(tmp_path, source, capsys, monkeypatch):
    folder = save_adapter(source, "x", tmp_path / "mine", LC, "tiny")
    monkeypatch.chdir(tmp_path)  # the default --library ./adapters must not appear
    assert main(["merge", "--lora", str(folder), "--output", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "merged" in out and "rank 4, attn.c_attn, mlp.c_fc" in out
    merged = load_base(str(tmp_path / "merged"), device="cpu")
    assert (logits(merged) - logits(source, "x")).abs().max() <= 1e-4
    assert not (tmp_path / "adapters").exists()


def test_cli_compare_titles_use_the_one_name_rule(tmp_path, source, capsys, monkeypatch):
    folder = save_adapter(source, "x", tmp_path / "mine", LC, "tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["compare", "--lora", str(folder), "--lora", str(folder / WEIGHTS), "--samples", "1",
                 "--max-tokens", "3", "--prompts", "Hi"]) == 0
    header = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("base ") and "|" in l)
    assert "mine" in header and "mine-2" in header
    assert not (tmp_path / "adapters").exists()
