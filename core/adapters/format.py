"""The adapter file format: PEFT-compatible folders (adapter_model.safetensors + adapter_config.json)
plus the run's record for what PEFT does not know (core.adapters.run_record: studio.json, history.jsonl).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from core import atomic
from core.adapters import run_record
from core.adapters.run_record import META  # noqa: F401 - the file names of an adapter, in one place
from core.lora import keys, variants
from core.lora.layers import adapter_state_dict
from core.lora.config import LoraConfig

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


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
    run's settings are written as PEFT writes the converted adapter (its variant's saved_config)."""
    lcfg = variants.of(lcfg).saved_config(lcfg)
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
    return {keys.peft_key(k): v.detach().to("cpu", torch.float32).contiguous()
            for k, v in adapter_state_dict(model, name).items()}


def write_adapter_folder(folder, tensors: dict[str, torch.Tensor], lcfg: LoraConfig, base_id: str,
                         meta: dict | None = None, history=None) -> Path:
    """Write the files of an adapter into `folder` (each atomically; its record, studio.json, last).
    history: its loss history's points (an iterable, read once), if it has one (run_record.write)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(folder / WEIGHTS, st_save(tensors, metadata={"format": "pt"}))
    atomic.write_text(folder / CONFIG, json.dumps(peft_config(lcfg, base_id), indent=2))
    meta = dict(meta or {})
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta.setdefault("base_model", base_id)
    meta["lora"] = lcfg.to_dict()  # the run's settings (a PiSSA run says so; its adapter_config.json is converted)
    run_record.write(folder, meta, history)
    return folder


def save_adapter(model, name: str, folder, lcfg: LoraConfig, base_id: str, meta: dict | None = None) -> Path:
    """Save loaded adapter `name` as a PEFT-compatible folder."""
    return write_adapter_folder(folder, adapter_tensors(model, name), lcfg, base_id, meta)
