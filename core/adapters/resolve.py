"""From an adapter reference (a library name, 'run@step', a folder or a .safetensors file) to a
validated adapter loaded in a model. The Engine is the one caller that turns references into loaded
adapters (core.engine); the CLI and the studio both go through it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable
from pathlib import Path

from core.adapters.format import CONFIG, WEIGHTS, name_from_path
from core.adapters.library import CHECKPOINTS, NAME_RE, Library, split_spec
from core.adapters.validate import PICKLE_HINT, PICKLE_SUFFIXES, AdapterError, read_adapter
from core.lora.layers import adapter_names, load_adapter_state, lora_parameters
from core.lora.config import LoraConfig


@dataclass(frozen=True)
class AdapterRef:
    """Where a reference points: the adapter's folder or file, and the library name it was found
    under (None for a path given directly)."""
    path: Path
    library_name: str | None = None


def library_entry(spec: str, library_dir) -> Path | None:
    """The library's folder for 'run' or 'run@step_000050' (AdapterError if it has none); None when
    there is no library folder at all: a lookup never creates one."""
    root = Path(library_dir).expanduser()
    return Library(root).path(spec) if root.is_dir() else None


def resolve(spec: str, library_dir) -> AdapterRef:
    """A library name ('run' or 'run@step_000050'), or a path to an adapter folder or to a
    .safetensors file with adapter_config.json beside it (the CLI's --lora)."""
    spec = str(spec).strip()
    if not spec:
        raise AdapterError("no adapter given: pass a library name or a path to an adapter folder.")
    run, ckpt = split_spec(spec)
    if NAME_RE.fullmatch(run):
        try:
            entry = library_entry(spec, library_dir)
            if entry is not None:
                return AdapterRef(entry, spec)
        except AdapterError:
            if ckpt is not None or not Path(spec).exists():
                raise
    return AdapterRef(_adapter_file(Path(spec).expanduser(), spec))


def display_name(path) -> str:
    """The name a user knows adapter `path` by, the reverse of `resolve`: 'run@step_000050' for a training
    checkpoint's folder (or a file in it), else the adapter name the path implies (format.name_from_path)."""
    p = Path(path)
    name = name_from_path(p)
    folder = p if p.is_dir() else p.parent
    if name == folder.name and folder.parent.name == CHECKPOINTS:
        return f"{folder.parent.parent.name}@{name}"
    return name


def _adapter_file(p: Path, spec: str) -> Path:
    """A path given as a reference, checked to be an adapter folder or a .safetensors file."""
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
    raise AdapterError(f"no adapter named {spec!r} in the library and no adapter "
                       f"file or folder at that path.")


def load_adapter(model, source_path, name: str | None = None, base_id: str | None = None,
                 run: Callable[[Callable[[], None]], None] | None = None) -> tuple[str, LoraConfig, dict]:
    """Validate an adapter folder/file against `model.config`, then load it as adapter `name`
    (default: the folder's name) for inference (dropout off, weights frozen). run(fn): where the model
    changes (a shared base's work loop: core.engine.Engine.on_loop); the files are read here.

    Returns (name, its LoraConfig as saved, studio.json or {}).
    """
    src = Path(source_path)
    if name is None:
        name = name_from_path(src)
    files = read_adapter(src, model.config, base_id)

    def attach() -> None:
        if name in adapter_names(model):
            raise AdapterError(f"an adapter named {name!r} is already loaded; unload it first or choose another "
                               f"name.")
        load_adapter_state(model, name, files.state, files.lcfg.alpha, dropout=0.0, lcfg=files.lcfg)
        for p in lora_parameters(model, name):
            p.requires_grad_(False)
    (run or (lambda fn: fn()))(attach)
    return name, files.lcfg, files.meta
