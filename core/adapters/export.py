"""A merged model: base + one adapter's update, written as an HF GPT2LMHeadModel folder."""
from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import torch

from core import atomic
from core.adapters.validate import AdapterError
from core.lora.layers import adapter_names, lora_layers
from core.model.weights import hf_state_dict, write_hf


@torch.no_grad()
def export_merged(model, adapter_name: str, out_dir, dtype: torch.dtype = torch.float32,
                  base_state: dict[str, torch.Tensor] | None = None) -> Path:
    """An HF GPT2LMHeadModel folder (config.json + model.safetensors) of base + adapter.
    base_state: the base's fp32 weights to merge into (see merged_state_dict).

    The merge happens in a copy of the weights (W + delta per projection), so the shared model
    is never touched; the folder is built beside `out_dir` and renamed into place.
    """
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise AdapterError(f"{out} already exists; choose a new folder for the merged model.")
    state = {k: v.to(dtype) for k, v in merged_state_dict(model, adapter_name, base_state).items()}
    if out.is_dir():
        out.rmdir()  # an empty folder the caller made: the export takes its place
    return write_hf(out, state, model.config)


@torch.no_grad()
def merged_state_dict(model, adapter_name: str,
                      base_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Base + adapter as float32 CPU tensors in HF GPT2LMHeadModel layout (Conv1D weights are (in, out); no
    lm_head: it is tied to transformer.wte). The one merge every export format starts from; the shared
    model is never touched. base_state: the same base's weights in fp32 (hf_state_dict of an fp32 load),
    for a model held in bf16, so the export is not rounded to bf16; default: the model's own weights."""
    if adapter_name not in adapter_names(model):
        raise AdapterError(f"no adapter named {adapter_name!r} is loaded.")
    state = {k: v.float() for k, v in (base_state if base_state is not None else hf_state_dict(model)).items()}
    for path, layer in lora_layers(model).items():
        if layer.has(adapter_name):
            merged = layer.merged_weight(adapter_name, state[f"{path}.weight"])  # plain or DoRA
            if not bool(torch.isfinite(merged).all()):
                raise AdapterError(f"merging {adapter_name!r} gives non-finite weights in {path}; refusing to export.")
            state[f"{path}.weight"] = merged
    return state


def zip_merged(folder) -> Path:
    """A merged export as one download: `<folder>.zip` beside it, holding `<folder name>/<file>`; the
    folder is removed. Weights are stored, not deflated: float tensors barely compress and deflating
    a gpt2-xl export would take minutes. Published whole or not at all (core.atomic.publish_file)."""
    folder = Path(folder)

    def write(tmp: Path):
        with zipfile.ZipFile(tmp, "w") as zf:
            for f in sorted(folder.iterdir()):
                zf.write(f, f"{folder.name}/{f.name}",
                         compress_type=zipfile.ZIP_STORED if f.suffix == ".safetensors" else zipfile.ZIP_DEFLATED)
    zpath = atomic.publish_file(folder.with_name(folder.name + ".zip"), write)
    shutil.rmtree(folder, ignore_errors=True)
    return zpath
