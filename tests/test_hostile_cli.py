"""The CLI against untrusted adapters and runs (issue 10): it never follows a base named by an
adapter unless that base is a known GPT-2 preset, and a finetune holds its run while it lives."""
from __future__ import annotations

import json

import pytest

import core.adapters.library as al
import core.engine
import core.train.trainer
import core.model.weights
from adapter_helpers import lora_tensors, write_adapter
from core.__main__ import main
from core.adapters.format import META
from core.lora.config import LoraConfig
from core.model.config import PRESETS
from cli_helpers import TINY_RUN, one_line_error

LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))


@pytest.fixture
def loads(monkeypatch):
    """Every base the CLI asks for; loading is refused, so nothing is downloaded or read."""
    asked = []

    def refuse(source, *a, **k):
        asked.append(source)
        raise core.model.weights.WeightsError(f"(test) not loading {source}")
    monkeypatch.setattr(core.engine, "load_base", refuse)  # every command loads its base through an Engine
    return asked


def _adapter(folder, base_in_config=None, base_in_meta=None):
    write_adapter(folder, lora_tensors(PRESETS["tiny"], r=4), LC, base_in_config)
    if base_in_meta is not None:
        (folder / META).write_text(json.dumps({"base_model": base_in_meta}))
    return folder


@pytest.mark.parametrize("config_base, meta_base", [
    ("attacker/evil-gpt2", None),  # a hub id: would be downloaded
    ("tiny", "/etc/secret-weights"),  # a local path in studio.json: would be read
    ("../../weights", None),
])
def test_compare_never_follows_an_unknown_recorded_base(tmp_path, capsys, loads, config_base, meta_base):
    ad = _adapter(tmp_path / "evil", config_base, meta_base)
    err = one_line_error(capsys, ["compare", "--lora", ad, "--library", tmp_path / "lib", "--samples", "1"])
    named = meta_base or config_base
    assert f"the adapter names its base {named!r}" in err and "pass --model or --weights" in err, err
    assert loads == []


def test_known_recorded_bases_map_to_their_preset(tmp_path, capsys, loads):
    ad = _adapter(tmp_path / "hub", "openai-community/gpt2")
    one_line_error(capsys, ["compare", "--lora", ad, "--library", tmp_path / "lib", "--samples", "1"])
    assert loads == ["gpt2"]


def test_model_names_the_base_whatever_the_adapter_says(tmp_path, capsys):
    ad = _adapter(tmp_path / "evil", "attacker/evil-gpt2")
    rc = main(["compare", "--lora", str(ad), "--model", "tiny", "--library", str(tmp_path / "lib"), "--samples", "1",
               "--max-tokens", "2"])
    assert rc == 0 and "base model: tiny" in capsys.readouterr().out


def test_finetune_holds_its_run_while_it_trains(prepared, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    opened = core.train.trainer.Trainer.open  # where a run starts, alone or co-batched

    def watched(self):
        seen.append(al._is_live(self.out_dir))
        yield from opened(self)
    monkeypatch.setattr(core.train.trainer.Trainer, "open", watched)
    lib = tmp_path / "lib"
    assert main(["finetune", "--data", str(prepared), *TINY_RUN, "--steps", "1", "--library", str(lib),
                 "--output", "held"]) == 0
    assert seen == [True] and not al._is_live(lib / "held")
    assert main(["finetune", "--resume", "held", "--library", str(lib), "--steps", "2"]) == 0
    assert seen == [True, True]
