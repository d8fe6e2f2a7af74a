"""Helpers for the adapter tests: adapters with non-zero weights, logits, crafted safetensors files, and
the base weights (to check that adapter work leaves them bit for bit)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from core.lora.keys import PEFT_PREFIX
from core.adapters.format import CONFIG, WEIGHTS, peft_config
from core.lora.config import LoraConfig
from core.lora.layers import add_adapter, lora_layers, lora_parameters

# two adapters for the engine tests: different ranks and targets
LX = LoraConfig(r=4, alpha=8.0, targets=("attn.c_attn", "mlp.c_fc"))
LY = LoraConfig(r=2, alpha=4.0, targets=("attn.c_proj",))
IDS = torch.tensor([[50256, 464, 2068, 7586, 21831, 18045, 625, 262], [40, 588, 257, 1332, 13, 198, 50256, 11]])


def make_adapter(model, name: str, lcfg: LoraConfig, seed: int = 0, std: float = 0.05) -> None:
    """A loaded adapter whose A and B are both random (B non-zero, so it changes the output)."""
    add_adapter(model, name, lcfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in lora_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def randomize_b(model, name, std=0.05, seed=0):
    """Tests make B non-zero so an adapter actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        if layer.has(name):
            B = layer.weights(name)[1]
            with torch.no_grad():
                B.copy_(torch.randn(B.shape, generator=g) * std)


def with_ab(model):
    """`model` with adapters 'a' (attention) and 'b' (MLP), B random enough to change greedy text."""
    add_adapter(model, "a", LoraConfig(r=4, targets=("attn.c_attn",)))
    add_adapter(model, "b", LoraConfig(r=8, targets=("mlp.c_fc", "mlp.c_proj")))
    randomize_b(model, "a", std=0.3, seed=1)
    randomize_b(model, "b", std=0.3, seed=2)
    return model


@torch.no_grad()
def logits(model, route=None, ids=IDS):
    return model(ids.to(model.device), route).float()


def base_tensors(model) -> dict[str, torch.Tensor]:
    """A copy of the base weights by name (LoRA wrapping moves 'c_attn.weight' to 'c_attn.base.weight')."""
    return {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def listing(lib) -> list[tuple[str, ...]]:
    """Everything visible in a library folder (names and files), to assert it did not change."""
    return sorted(tuple(p.relative_to(lib.root).parts) for p in lib.root.rglob("*") if p.name != ".lock")


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], lcfg: LoraConfig | None = None,
                  base_id: str | None = None, config: dict | None = None, raw: bytes | None = None) -> Path:
    """A hand-made adapter folder: any tensors (PEFT keys), any config, or raw weight bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    data = raw if raw is not None else st_save({k: v.contiguous() for k, v in tensors.items()})
    (folder / WEIGHTS).write_bytes(data)
    cfg = config if config is not None else peft_config(lcfg or LoraConfig(), base_id)
    (folder / CONFIG).write_text(json.dumps(cfg))
    return folder


def lora_tensors(cfg, r: int = 4, targets=("attn.c_attn",), layers=None, seed: int = 0, dtype=torch.float32):
    """Random PEFT-keyed LoRA tensors of the right shapes for GPT config `cfg`."""
    from core.lora.layers import target_shapes
    g = torch.Generator().manual_seed(seed)
    shapes = target_shapes(cfg)
    out = {}
    for i in (range(cfg.n_layer) if layers is None else layers):
        for t in targets:
            fan_in, fan_out = shapes[t]
            out[f"{PEFT_PREFIX}transformer.h.{i}.{t}.lora_A.weight"] = (torch.randn(r, fan_in, generator=g) * 0.05).to(dtype)
            out[f"{PEFT_PREFIX}transformer.h.{i}.{t}.lora_B.weight"] = (torch.randn(fan_out, r, generator=g) * 0.05).to(dtype)
    return out
