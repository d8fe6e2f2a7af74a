"""Crafted bad adapter files, each with the message that must refuse it: tensors (shapes, keys, ranks,
dtypes, values), raw bytes (truncated, pickled, hostile headers) and adapter_config.json fields. Every
case is a mutation of `good()`. Shared by the core validation tests (test_adapter_validation.py) and the
studio's upload tests (test_bad_inputs.py, test_pickle_payloads.py)."""
from __future__ import annotations

import struct

import torch
from safetensors.torch import save as st_save

from adapter_helpers import lora_tensors
from core.lora.keys import PEFT_PREFIX
from core.adapters.format import peft_config
from core.lora.config import LoraConfig
from core.model.config import PRESETS

TINY = PRESETS["tiny"]  # 2 layers, width 64
LC = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",))
KA = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_A.weight"
KB = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_B.weight"
LC_DORA = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn",), use_dora=True)
KM = PEFT_PREFIX + "transformer.h.0.attn.c_attn.lora_magnitude_vector"


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


def good_dora():
    """good() as a DoRA adapter: a magnitude (one per output feature, 192 for c_attn) on every target."""
    t = good()
    for k in [k for k in t if k.endswith("lora_A.weight")]:
        t[k.removesuffix("lora_A.weight") + "lora_magnitude_vector"] = torch.rand(192) + 0.5
    return t


def _no_magnitude():
    t = good_dora()
    del t[KM]
    return t


def _magnitude_shape():
    t = good_dora()
    t[KM] = torch.ones(191)
    return t


def _magnitude_2d():
    t = good_dora()
    t[KM] = torch.ones(192, 1)
    return t


def _magnitude_inf():
    t = good_dora()
    t[KM][5] = float("inf")
    return t


# DoRA files (written with LC_DORA's config unless the case names another): each refused, nothing loaded
DORA_CASES = {
    "missing magnitude": (_no_magnitude, LC_DORA, r"lora_magnitude_vector' is missing; .* sets use_dora"),
    "magnitude shape": (_magnitude_shape, LC_DORA, r"lora_magnitude_vector' has shape \[191\], expected \[192\]"),
    "magnitude 2-D": (_magnitude_2d, LC_DORA, r"a DoRA magnitude vector is 1-D"),
    "magnitude not finite": (_magnitude_inf, LC_DORA, r"lora_magnitude_vector' contains NaN or infinite values"),
    "magnitude without use_dora": (good_dora, LC, r"holds '.*lora_magnitude_vector', which a LoRA adapter does not "
                                                  r"have; .* does not set use_dora"),
}


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


def config_with(**over):
    """The good adapter's PEFT config with some fields changed."""
    c = peft_config(LC, None)
    c.update(over)
    return c


CONFIG_CASES = {
    "r mismatch": (config_with(r=8), r"says r=8 but the tensors .* have rank 4"),
    "r zero": (config_with(r=0), r"r must be a whole number from 1 to 256 \(got 0\)"),
    "alpha negative": (config_with(lora_alpha=-1), r"lora_alpha must be a positive number"),
    "not lora": (config_with(peft_type="IA3"), r"peft_type is 'IA3'; only LoRA"),
    "use_dora not a bool": (config_with(use_dora="yes"), r"use_dora must be true or false \(got 'yes'\)"),
    "rank pattern disagrees": (config_with(rank_pattern={"c_attn": 8}),
                               r"has rank 4 but the config's r/rank_pattern give 8 for "
                               r"transformer\.h\.0\.attn\.c_attn"),
    "pattern names no module": (config_with(rank_pattern={"h.7.attn.c_attn": 4}),
                                r"rank_pattern: 'h\.7\.attn\.c_attn' names no wrapped module"),
    "alpha pattern not a number": (config_with(alpha_pattern={"c_attn": "x"}),
                                   r"alpha_pattern: 'c_attn' -> 'x'; the alpha must be a positive number"),
    "rank pattern not an object": (config_with(rank_pattern=[4]), r"rank_pattern must be a JSON object"),
    "pattern not a regex": (config_with(alpha_pattern={"c_attn(": 4}), r"'c_attn\(' is not a valid regular expression"),
    "rslora not a bool": (config_with(use_rslora="yes"), r"use_rslora must be true or false"),
    "unknown target": (config_with(target_modules=["q_proj"]), r"unknown target module 'q_proj'; choose from"),
    "unlisted target": (config_with(target_modules=["c_fc"]),
                        r"has weights for attn\.c_attn but .* does not list it"),
    "bias": (config_with(bias="all"), r"bias='all' is not supported"),
    "base mismatch": (config_with(base_model_name_or_path="gpt2-medium"),
                      r"made for gpt2-medium \(24 layers, width 1024\)"),
}
