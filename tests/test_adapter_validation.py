"""Every validation rule with a crafted bad file (the cases are in bad_adapters.py): its own clear
message, and nothing changes.

Each bad adapter is offered twice: imported into the library (which must stay as it was) and
loaded into a model (which must end up with no new adapter).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from adapter_helpers import listing, lora_tensors, write_adapter
from bad_adapters import CONFIG_CASES, DORA_CASES, KA, LC, RAW_CASES, TENSOR_CASES, TINY, config_with, good
from core.lora.keys import PEFT_PREFIX
from core.adapters.format import CONFIG, peft_config
from core.adapters.validate import AdapterError
from core.adapters.library import Library
from core.adapters.resolve import load_adapter
from core.lora.layers import adapter_names


def _check_refused(tmp_path, folder, pattern):
    lib = Library(tmp_path / "lib")
    before = listing(lib)
    with pytest.raises(AdapterError, match=pattern):
        lib.import_path(folder, "incoming", base_cfg=TINY)
    assert listing(lib) == before and lib.list() == []
    from core.model.weights import load_base
    model = load_base("tiny", device="cpu")
    with pytest.raises(AdapterError, match=pattern):
        load_adapter(model, folder, "incoming")
    assert adapter_names(model) == []


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_bad_tensors_are_refused(tmp_path, case):
    make, pattern = TENSOR_CASES[case]
    _check_refused(tmp_path, write_adapter(tmp_path / "bad", make(), LC), pattern)


@pytest.mark.parametrize("case", list(DORA_CASES))
def test_broken_dora_files_are_refused(tmp_path, case):
    make, lcfg, pattern = DORA_CASES[case]
    _check_refused(tmp_path, write_adapter(tmp_path / "bad", make(), lcfg), pattern)


def test_a_good_dora_file_loads(tmp_path, tiny):
    from bad_adapters import LC_DORA, good_dora
    name, lcfg, _ = load_adapter(tiny, write_adapter(tmp_path / "dora", good_dora(), LC_DORA))
    assert lcfg.use_dora and name in adapter_names(tiny)


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_bad_files_are_refused(tmp_path, case):
    make, pattern = RAW_CASES[case]
    _check_refused(tmp_path, write_adapter(tmp_path / "bad", {}, LC, raw=make()), pattern)


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_configs_are_refused(tmp_path, case):
    config, pattern = CONFIG_CASES[case]
    _check_refused(tmp_path, write_adapter(tmp_path / "bad", good(), config=config), pattern)


def test_messages_are_distinct():
    patterns = [p for _, p in TENSOR_CASES.values()] + [p for _, p in RAW_CASES.values()]
    assert len(set(patterns)) == len(patterns)


def test_the_good_adapter_passes(tmp_path):
    """The baseline every bad case is a mutation of: it imports and loads."""
    folder = write_adapter(tmp_path / "ok", good(), LC, base_id="tiny")
    lib = Library(tmp_path / "lib")
    assert lib.import_path(folder, "ok", base_cfg=TINY) == "ok"
    from core.model.weights import load_base
    assert load_adapter(load_base("tiny", device="cpu"), folder)[0] == "ok"


def test_file_size_cap(tmp_path):
    folder = write_adapter(tmp_path / "big", good(), LC)
    lib = Library(tmp_path / "lib", max_bytes=1000)
    with pytest.raises(AdapterError, match=r"MiB, over the 0 MiB limit"):
        lib.import_path(folder, "big")
    assert lib.list() == []


def test_width_mismatch_names_key(tmp_path):
    """An adapter for a wider model: the first key's shape is reported against the loaded base."""
    from conftest import MEDIUM_SHAPED
    folder = write_adapter(tmp_path / "wide", lora_tensors(MEDIUM_SHAPED, r=4), LC)
    _check_refused(tmp_path, folder, r"has shape \[4, 128\], expected \[4, 64\]")


def test_inconsistent_widths_without_a_base(tmp_path):
    t = good()
    k = PEFT_PREFIX + "transformer.h.1.attn.c_attn.lora_"
    t[k + "A.weight"], t[k + "B.weight"] = torch.zeros(4, 128), torch.zeros(384, 4)
    lib = Library(tmp_path / "lib")
    with pytest.raises(AdapterError, match=r"expected \[4, 64\] .*as in the other weights"):
        lib.import_path(write_adapter(tmp_path / "mixed", t, LC), "mixed")


def test_pickled_adapters_are_refused(tmp_path):
    folder = tmp_path / "peft_bin"
    folder.mkdir()
    torch.save(good(), folder / "adapter_model.bin")
    (folder / CONFIG).write_text(json.dumps(peft_config(LC, None)))
    lib = Library(tmp_path / "lib")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin but no adapter_model\.safetensors: pickle"):
        lib.import_path(folder, "x")
    with pytest.raises(AdapterError, match=r"never loaded; re-save the adapter as safetensors"):
        lib.import_path(folder / "adapter_model.bin", "x")
    assert lib.list() == []


def test_missing_config_and_bad_json(tmp_path):
    folder = write_adapter(tmp_path / "a", good(), LC)
    (folder / CONFIG).unlink()
    lib = Library(tmp_path / "lib")
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing beside adapter_model\.safetensors"):
        lib.import_path(folder, "a")
    (folder / CONFIG).write_text("{not json")
    with pytest.raises(AdapterError, match=r"adapter_config\.json \(adapter config\) is not valid JSON"):
        lib.import_path(folder, "a")
    assert lib.list() == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_accepted(tmp_path, dtype, tiny):
    folder = write_adapter(tmp_path / "h", lora_tensors(TINY, r=4, dtype=dtype), LC)
    name, lcfg, _ = load_adapter(tiny, folder)
    assert (name, lcfg.r, lcfg.targets) == ("h", 4, ("attn.c_attn",))


def test_peft_key_variants_are_accepted(tmp_path, tiny):
    """'lora_A.default.weight' (adapter-name infix) and keys without the PEFT prefix load the same."""
    t = good()
    infixed = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v for k, v in t.items()}
    bare = {k[len(PEFT_PREFIX):]: v for k, v in t.items()}
    load_adapter(tiny, write_adapter(tmp_path / "infix", infixed, LC), "infix")
    load_adapter(tiny, write_adapter(tmp_path / "bare", bare, LC), "bare")
    from core.lora.layers import adapter_state_dict
    a, b = adapter_state_dict(tiny, "infix"), adapter_state_dict(tiny, "bare")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_duplicate_key_forms_are_refused(tmp_path):
    t = good()
    t[KA.replace(".lora_A.", ".lora_A.default.")] = t[KA].clone()
    lib = Library(tmp_path / "lib")
    with pytest.raises(AdapterError, match=r"duplicates another key"):
        lib.import_path(write_adapter(tmp_path / "d", t, LC), "d")


def test_rslora_alpha_is_converted(tmp_path, tiny):
    folder = write_adapter(tmp_path / "rs", good(), config=config_with(use_rslora=True, lora_alpha=8))
    _, lcfg, _ = load_adapter(tiny, folder)
    assert lcfg.scaling == pytest.approx(8 / 4 ** 0.5)


def test_a_header_length_that_looks_like_pickle_bytes_is_still_safetensors(tmp_path, tiny):
    """The first 8 bytes are the header length: 0x80 then 0x02..0x05 is also how a pickle starts."""
    t = good()
    for pad in range(600):
        raw = st_save(t, metadata={"note": "x" * pad})
        if raw[0] == 0x80 and raw[1] in (2, 3, 4, 5):
            break
    else:
        pytest.fail("no padding made the header length start with 0x80 0x02..0x05")
    folder = write_adapter(tmp_path / "lookalike", {}, LC, raw=raw)
    assert load_adapter(tiny, folder)[0] == "lookalike"
