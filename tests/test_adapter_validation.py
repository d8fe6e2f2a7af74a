"""Every validation rule with a crafted bad file: its own clear message, and nothing changes.

Each bad adapter is offered twice: imported into the library (which must stay as it was) and
loaded into a model (which must end up with no new adapter).
"""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from adapter_helpers import listing, lora_tensors, write_adapter
from core.adapters.format import CONFIG, PEFT_PREFIX, peft_config
from core.adapters.validate import AdapterError
from core.adapters.library import Library
from core.adapters.resolve import load_adapter
from core.model.config import LoraConfig, PRESETS
from core.lora.layers import adapter_names

TINY = PRESETS["tiny"]  # 2 layers, width 64
LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))
KA = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"
KB = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"


def good():
    return lora_tensors(TINY, r=4)


def _bad_shape():
    t = good()
    t[KA] = torch.zeros(4, 65)
    return t


def _extra_key():
    t = good()
    t[PEFT_PREFIX + "transformer.wte.weight"] = torch.zeros(2, 2)
    return t


def _layer_out_of_range():
    return lora_tensors(TINY, r=4, layers=[0, 5])


def _nan():
    t = good()
    t[KB][3, 1] = float("nan")
    return t


def _rank0():
    t = good()
    t[KA], t[KB] = torch.zeros(0, 64), torch.zeros(192, 0)
    return t


def _int_dtype():
    t = good()
    t[KB] = torch.ones(192, 4, dtype=torch.int32)
    return t


def _missing_b():
    t = good()
    del t[KB]
    return t


def _mixed_ranks():
    t = good()
    k = PEFT_PREFIX + "transformer.h.1.attn.c_attn.lora_"
    t[k + "A.weight"], t[k + "B.weight"] = torch.zeros(2, 64), torch.zeros(192, 2)
    return t


def _rank_too_big():
    t = good()
    t[KA], t[KB] = torch.zeros(300, 64), torch.zeros(192, 300)
    return t


def _three_d():
    t = good()
    t[KA] = torch.zeros(4, 64, 1)
    return t


TENSOR_CASES = {
    "wrong shape": (_bad_shape, r"has shape \[4, 65\], expected \[4, 64\]"),
    "extra key": (_extra_key, r"unexpected key 'base_model\.model\.transformer\.wte\.weight'"),
    "layer out of range": (_layer_out_of_range, r"layer 5 but the loaded base has 2 layers"),
    "NaN": (_nan, r"lora_B\.weight' contains NaN or infinite values"),
    "rank 0": (_rank0, r"has rank 0 .*must be 1\.\.256"),
    "rank 300": (_rank_too_big, r"has rank 300"),
    "int dtype": (_int_dtype, r"has dtype I32; adapter weights must be F32, F16, BF16"),
    "missing B": (_missing_b, r"has no matching lora_B"),
    "mixed ranks": (_mixed_ranks, r"must use a single rank"),
    "3-D": (_three_d, r"LoRA weights are 2-D"),
}


def _raw_truncated():
    return st_save(good())[:-100]


def _raw_pickle():
    import io
    buf = io.BytesIO()
    torch.save(good(), buf)
    return buf.getvalue()


def _raw_legacy_pickle():
    import pickle
    return pickle.dumps({"a": 1}, protocol=2)


def _raw_oversized_header():
    return struct.pack("<Q", 10**12) + b"{}" * 8


def _raw_header_past_end():
    return struct.pack("<Q", 5000) + b'{"a": 1}'


def _raw_not_json():
    return struct.pack("<Q", 8) + b"\xff\xfe\x00garb" + b"\0" * 16


def _raw_tiny():
    return b"\x01\x02"


def _raw_trailing():
    return st_save(good()) + b"junk"


RAW_CASES = {
    "truncated data": (_raw_truncated, r"is truncated: tensor data should end at byte"),
    "pickle renamed": (_raw_pickle, r"is a PyTorch pickle \(torch\.save\), not safetensors"),
    "legacy pickle renamed": (_raw_legacy_pickle, r"is a PyTorch pickle"),
    "oversized header": (_raw_oversized_header, r"header claims 1000000000000 bytes, over the 1048576 byte limit"),
    "header past end": (_raw_header_past_end, r"is truncated: its header needs 5000 bytes"),
    "header not JSON": (_raw_not_json, r"is not a safetensors file \(its header is not JSON\)"),
    "8 bytes short": (_raw_tiny, r"too short for a safetensors file"),
    "trailing bytes": (_raw_trailing, r"could not be read as safetensors"),
}


def _cfg(**over):
    c = peft_config(LC, None)
    c.update(over)
    return c


CONFIG_CASES = {
    "r mismatch": (_cfg(r=8), r"says r=8 but the tensors .* have rank 4"),
    "r zero": (_cfg(r=0), r"r must be a whole number from 1 to 256 \(got 0\)"),
    "alpha negative": (_cfg(lora_alpha=-1), r"lora_alpha must be a positive number"),
    "not lora": (_cfg(peft_type="IA3"), r"peft_type is 'IA3'; only LoRA"),
    "dora": (_cfg(use_dora=True), r"DoRA \(use_dora\) is not supported"),
    "rank pattern": (_cfg(rank_pattern={"c_attn": 8}), r"rank_pattern/alpha_pattern"),
    "unknown target": (_cfg(target_modules=["q_proj"]), r"target module 'q_proj' is not one of GPT-2's"),
    "unlisted target": (_cfg(target_modules=["c_fc"]), r"has weights for attn\.c_attn but .* does not list it"),
    "bias": (_cfg(bias="all"), r"bias='all' is not supported"),
    "base mismatch": (_cfg(base_model_name_or_path="gpt2-medium"), r"made for gpt2-medium \(24 layers, width 1024\)"),
}


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
    folder = write_adapter(tmp_path / "rs", good(), config=_cfg(use_rslora=True, lora_alpha=8))
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
