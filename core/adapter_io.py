"""The adapter file format: PEFT-compatible folders (adapter_model.safetensors + adapter_config.json)
plus studio.json for what PEFT does not know (dataset, training settings, loss history).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from . import atomic
from .config import LoraConfig
from .lora import adapter_state_dict

PEFT_PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
META = "studio.json"


def peft_config(lcfg: LoraConfig, base_id: str) -> dict:
    """adapter_config.json as PEFT writes it for GPT-2 (Conv1D layers: fan_in_fan_out)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id,
        "r": lcfg.r, "lora_alpha": int(lcfg.alpha) if float(lcfg.alpha).is_integer() else lcfg.alpha, "lora_dropout": lcfg.dropout,
        # full module paths so PEFT matches attn.c_proj and mlp.c_proj separately
        "target_modules": list(lcfg.targets), "fan_in_fan_out": True, "bias": "none",
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
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
    meta["lora"] = lcfg.to_dict()
    atomic.write_text(folder / META, json.dumps(meta, indent=2))
    return folder


def save_adapter(model, name: str, folder, lcfg: LoraConfig, base_id: str, meta: dict | None = None) -> Path:
    """Save loaded adapter `name` as a PEFT-compatible folder."""
    return write_adapter_folder(folder, adapter_tensors(model, name), lcfg, base_id, meta)
