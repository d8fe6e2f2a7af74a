"""The adapter file format: PEFT-compatible folders (adapter_model.safetensors + adapter_config.json)
plus studio.json for what PEFT does not know (dataset, training settings, loss history).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from core import atomic, safe_json
from core.lora.layers import TARGET_PATTERN, adapter_state_dict
from core.lora.variants import converted
from core.model.config import MAX_LOADED_ALPHA, MAX_PROMPT_CHARS, MAX_RANK, LoraConfig

PEFT_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
META = "studio.json"
MAX_HISTORY = 1_000_000  # loss-history points kept from a studio.json (one per step)

# A matrix's key as core.lora names it (LORA_KEY, lora_key); files add PEFT_PREFIX in front. As found in
# a file: the prefix optional, PEFT's adapter-name infix ('lora_A.default.weight') tolerated, and no
# leading zeros in the layer index (two spellings of one weight would collide). Group 3 is A or B, or None
# for DoRA's magnitude vector (saved by PEFT without '.weight'; core.lora.dora)
FILE_KEY = re.compile(rf"^(?:{re.escape(PEFT_PREFIX)})?transformer\.h\.(0|[1-9]\d*)\.({TARGET_PATTERN})"
                      rf"\.(?:lora_([AB])(?:\.default)?\.weight|lora_magnitude_vector(?:\.default)?(?:\.weight)?)$")


def name_from_path(path) -> str:
    """The adapter name a path implies (the one rule, for loading and importing): a folder's name,
    also for the folder's own adapter_model.safetensors; else the file's stem ('x.safetensors',
    'x.zip' -> 'x')."""
    p = Path(path)
    if p.is_dir():
        return p.name
    return p.parent.name if p.name == WEIGHTS else p.stem


def peft_config(lcfg: LoraConfig, base_id: str) -> dict:
    """adapter_config.json as PEFT writes it for GPT-2 (Conv1D layers: fan_in_fan_out). A PiSSA/OLoRA
    run's settings are written as PEFT writes the converted adapter (core.lora.variants.converted)."""
    lcfg = converted(lcfg)
    num = lambda a: int(a) if float(a).is_integer() else a  # noqa: E731 - PEFT writes whole alphas as ints
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id,
        "r": lcfg.r, "lora_alpha": int(lcfg.alpha) if float(lcfg.alpha).is_integer() else lcfg.alpha, "lora_dropout": lcfg.dropout,
        # full module paths so PEFT matches attn.c_proj and mlp.c_proj separately
        "target_modules": list(lcfg.targets), "fan_in_fan_out": True, "bias": "none",
        "inference_mode": True, "modules_to_save": None,
        "init_lora_weights": "gaussian" if lcfg.init == "gaussian" else True,
        "use_rslora": bool(lcfg.use_rslora), "use_dora": bool(lcfg.use_dora), "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": dict(lcfg.rank_pattern),
        "alpha_pattern": {k: num(v) for k, v in lcfg.alpha_pattern.items()}, "revision": None,
    }


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """PEFT-keyed fp32 tensors of a loaded adapter (contiguous CPU copies)."""
    return {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in adapter_state_dict(model, name).items()}


def write_adapter_folder(folder, tensors: dict[str, torch.Tensor], lcfg: LoraConfig, base_id: str,
                         meta: dict | None = None) -> Path:
    """Write the three files of an adapter into `folder` (each atomically; studio.json last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(folder / WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    atomic.write_text(folder / CONFIG, json.dumps(peft_config(lcfg, base_id), indent=2))
    meta = dict(meta or {})
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta.setdefault("base_model", base_id)
    meta["lora"] = lcfg.to_dict()  # the run's settings (a PiSSA run says so; its adapter_config.json is converted)
    atomic.write_text(folder / META, json.dumps(meta, indent=2))
    return folder


def save_adapter(model, name: str, folder, lcfg: LoraConfig, base_id: str, meta: dict | None = None) -> Path:
    """Save loaded adapter `name` as a PEFT-compatible folder."""
    return write_adapter_folder(folder, adapter_tensors(model, name), lcfg, base_id, meta)


# ---- studio.json as found on disk: every known field checked, the rest dropped ------------------

class _Bad(ValueError):
    """A known studio.json field with a value of the wrong kind; the message says which."""


def _text(x):
    if x is not None and safe_json.text(x) is None:
        raise _Bad("is not a short valid UTF-8 string")
    return x


def _prompt(x):
    if safe_json.text(x, MAX_PROMPT_CHARS) is None:
        raise _Bad(f"is not a valid UTF-8 prompt of at most {MAX_PROMPT_CHARS} characters")
    return x


def _bool(x):
    if not isinstance(x, bool):
        raise _Bad("is not true or false")
    return x


def _date(x):
    if x is not None and safe_json.date(x) is None:
        raise _Bad(f"is not a date from {safe_json.FIRST_YEAR} to {safe_json.LAST_YEAR}")
    return x


def _num(lo=-float("inf"), hi=float("inf")):
    def check(x):
        if x is not None and safe_json.number(x, lo, hi) is None:
            raise _Bad(f"is not a finite number from {lo:g} to {hi:g}")
        return x
    return check


def _int(lo=0, hi=10**9):
    def check(x):
        if x is not None and safe_json.integer(x, lo, hi) is None:
            raise _Bad(f"is not a whole number from {lo} to {hi}")
        return x
    return check


def _record(fields: dict):
    """A JSON object whose listed keys are checked (others dropped)."""
    def check(x):
        if not isinstance(x, dict):
            raise _Bad("is not a JSON object")
        return {k: f(x[k]) for k, f in fields.items() if k in x}
    return check


def _list_of(item, limit: int):
    def check(x):
        if not isinstance(x, list) or len(x) > limit:
            raise _Bad(f"is not a list of at most {limit} items")
        return [item(v) for v in x]
    return check


def _scalar(x):
    """A training setting: text, number, bool, None, or a list of texts (sample prompts)."""
    if isinstance(x, list):
        return _list_of(_prompt, 64)(x)
    if x is None or isinstance(x, bool):
        return x
    return _num()(x) if isinstance(x, (int, float)) else _text(x)


def _pattern(top):
    """{module regex: number}: short keys, bounded values (checked fully when the adapter is used)."""
    def check(x):
        if not isinstance(x, dict) or len(x) > 384:
            raise _Bad("is not a JSON object of at most 384 module patterns")
        return {_text(k): _num(0, top)(v) for k, v in x.items()}
    return check


def _training(x):
    if not isinstance(x, dict) or len(x) > 64:
        raise _Bad("is not a JSON object of training settings")
    return {_text(k): _scalar(v) for k, v in x.items()}


def _dataset(x):
    if isinstance(x, str) or x is None:
        return _text(x)
    return _record({"name": _text, "sha256": _text, "path": _text, "train_tokens": _int(0, 10**12),
                    "val_tokens": _int(0, 10**12)})(x)


# one history point per optimizer step (core.train.trainer); val_loss at evaluations; the last four since
# metrics export (older files lack them)
_POINT = _record({"step": _int(), "loss": _num(), "lr": _num(), "val_loss": _num(), "grad_norm": _num(),
                  "tokens_per_sec": _num(), "elapsed": _num(), "wall_time": _num()})
META_FIELDS = {  # every field this app writes to studio.json, and what it may hold
    **{k: _text for k in ("name", "base_model", "status", "user", "imported_from", "duplicated_from",
                          "restored_from")},
    "created": _date, "imported": _date, "steps": _int(), "shared": _bool,
    **{k: _num() for k in ("train_loss", "val_loss", "start_val_loss")},
    "dataset": _dataset, "training": _training, "history": _list_of(_POINT, MAX_HISTORY),
    "lora": _record({"r": _int(1, MAX_RANK), "alpha": _num(0, MAX_LOADED_ALPHA), "dropout": _num(0, 1),
                     "targets": _list_of(_text, 8), "use_dora": _bool, "use_rslora": _bool, "init": _text,
                     "loraplus_lr_ratio": _num(0, 1000), "rank_pattern": _pattern(MAX_RANK),
                     "alpha_pattern": _pattern(MAX_LOADED_ALPHA)}),
    "blend": _list_of(_record({"name": _text, "weight": _num()}), 64),
}


def clean_meta(raw) -> tuple[dict, str | None]:
    """studio.json's known fields with checked values, and the first problem found (None if none).
    A field that fails its check is dropped; unknown fields are dropped too."""
    if not isinstance(raw, dict):
        return {}, f"{META} is not a JSON object"
    why = safe_json.problem(raw)  # anywhere, unknown fields too; the checks below have a fixed depth
    out, problem = {}, (f"{META} {why}" if why else None)
    for key, check in META_FIELDS.items():
        if key not in raw:
            continue
        try:
            out[key] = check(raw[key])
        except _Bad as e:
            problem = problem or f"{META}: {key!r} {e}"
    return out, problem
