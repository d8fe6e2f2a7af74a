"""The adapter library's public face: find an adapter, load it into a model, export a merged model.

The pieces live beside this file, one job each: adapter_validate (every check before a tensor
is used), adapter_library (the folder on disk), adapter_blend (exact weighted blends),
adapter_zip (guarded zip import, export), adapter_io (the PEFT file format itself).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import atomic
from .adapter_io import CONFIG, WEIGHTS
from .adapter_library import NAME_RE, AdapterEntry, Library, check_name
from .adapter_validate import (MAX_FILE_BYTES, PICKLE_HINT, PICKLE_SUFFIXES, AdapterError, AdapterFiles,
                               read_adapter)
from .config import LoraConfig
from .lora import adapter_names, load_adapter_state, lora_layers, lora_parameters, merged_name
from .weights import hf_state_dict

__all__ = ["AdapterError", "AdapterEntry", "AdapterFiles", "Library", "MAX_FILE_BYTES", "check_name",
           "export_merged", "load_adapter", "read_adapter", "resolve"]


def resolve(spec: str, library_dir) -> Path:
    """A library name ('run' or 'run@step_000050'), or a path to an adapter folder or to a
    .safetensors file with adapter_config.json beside it (the CLI's --lora)."""
    spec = str(spec).strip()
    if not spec:
        raise AdapterError("no adapter given: pass a library name or a path to an adapter folder.")
    run = spec.partition("@")[0]
    if NAME_RE.fullmatch(run) and Path(library_dir).expanduser().is_dir():  # never create it here
        try:
            return Library(library_dir).path(spec)
        except AdapterError:
            if "@" in spec or not Path(spec).exists():
                raise
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / WEIGHTS).is_file():
            if any(q.suffix in PICKLE_SUFFIXES for q in p.iterdir()):
                raise AdapterError(f"{p} holds only a pickled adapter: {PICKLE_HINT}")
            raise AdapterError(f"{p} is not an adapter folder (no {WEIGHTS}).")
        return p
    if p.is_file():
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterError(f"{p.name}: {PICKLE_HINT}")
        if p.suffix.lower() != ".safetensors":
            raise AdapterError(f"{p.name}: pass an adapter folder or its .safetensors file"
                               f"{' (import a .zip into the library first)' if p.suffix.lower() == '.zip' else ''}.")
        if not (p.parent / CONFIG).is_file():
            raise AdapterError(f"{p.name} needs {CONFIG} beside it (rank, alpha and target modules).")
        return p
    raise AdapterError(f"no adapter named {spec!r} in the library ({Path(library_dir).resolve()}) and no adapter "
                       f"file or folder at that path.")


def load_adapter(model, source_path, name: str | None = None,
                 base_id: str | None = None) -> tuple[str, LoraConfig, dict]:
    """Validate an adapter folder/file against `model.config`, then load it as adapter `name`
    (default: the folder's name) for inference (dropout off, weights frozen).

    Returns (name, its LoraConfig as saved, studio.json or {}).
    """
    src = Path(source_path)
    if name is None:
        name = src.name if src.is_dir() else (src.parent.name if src.name == WEIGHTS else src.stem)
    if name in adapter_names(model):
        raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or choose another name.")
    files = read_adapter(src, model.config, base_id)
    load_adapter_state(model, name, files.state, files.lcfg.alpha, dropout=0.0)
    for p in lora_parameters(model, name):
        p.requires_grad_(False)
    return name, files.lcfg, files.meta


@torch.no_grad()
def export_merged(model, adapter_name: str, out_dir, dtype: torch.dtype = torch.float32) -> Path:
    """An HF GPT2LMHeadModel folder (config.json + model.safetensors) of base + adapter.

    The merge happens in a copy of the weights (W + delta per projection), so the shared model
    is never touched; the folder is built beside `out_dir` and renamed into place.
    """
    out = Path(out_dir)
    if merged_name(model) is not None:
        raise AdapterError(f"adapter {merged_name(model)!r} is merged into the model's weights; unmerge it first.")
    if adapter_name not in adapter_names(model):
        raise AdapterError(f"no adapter named {adapter_name!r} is loaded.")
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise AdapterError(f"{out} already exists; choose a new folder for the merged model.")
    state = {k: v.float() for k, v in hf_state_dict(model).items()}  # HF layout: Conv1D is (in, out)
    for path, layer in lora_layers(model).items():
        if layer.has(adapter_name):
            merged = state[f"{path}.weight"] + layer.delta(adapter_name).to("cpu").t()
            if not bool(torch.isfinite(merged).all()):
                raise AdapterError(f"merging {adapter_name!r} gives non-finite weights in {path}; refusing to export.")
            state[f"{path}.weight"] = merged
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path):
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic.write_text(tmp / "config.json", json.dumps(model.config.to_hf(), indent=2))
    if out.is_dir():
        out.rmdir()  # an empty folder the caller made: the export takes its place
    atomic.publish_dir(out, build)
    return out
