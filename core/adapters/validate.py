"""Checking adapter files before any tensor is used.

Order of checks, cheapest and safest first: file kind and size -> the raw safetensors header
(length guarded against the file size and a cap, so a hostile header never reaches the parser)
-> adapter_config.json -> names, dtypes and shapes from the header via `safe_open` -> only then
the values (all finite). Every failure is an `AdapterError` naming the file or key and the
problem. Nothing here writes anything; pickles (.bin/.pt) are never opened.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from core import safe_json
from core.checks import is_real, is_whole
from core.adapters import run_record
from core.adapters.format import CONFIG, WEIGHTS
from core.adapters.run_record import META
from core.lora import keys, patterns, variants
from core.lora.config import MAX_LOADED_ALPHA, MAX_RANK, LoraConfig, normalize_targets
from core.model.config import HUB_IDS, PRESETS, GPTConfig, target_shapes, width_from_a

MAX_FILE_BYTES = 256 * 2**20  # adapter_model.safetensors
# a real adapter's header: <= 384 tensors (48 layers x 4 projections x A/B) of ~150 bytes each;
# safetensors itself allows 100 MB, which parses for seconds into gigabytes (1M zero-size keys)
MAX_HEADER_BYTES = 1 << 20
MAX_TENSORS = 1024
# |value| of a LoRA matrix: trained adapters stay below ~10 (A starts near 1/sqrt(in), B at 0);
# 3e38 passes the finiteness check yet overflows every product (generation then prints 'GGGG')
MAX_VALUE = 10_000.0
MAX_JSON_BYTES = 16 * 2**20  # adapter_config.json (and parts of an adapter zip)
DTYPES = ("F32", "F16", "BF16")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_HINT = ("pickle files can run code when opened, so they are never loaded; re-save the adapter "
               "as safetensors (PEFT: model.save_pretrained(dir, safe_serialization=True)).")


class AdapterError(ValueError):
    """A user-facing problem with an adapter: the message says what is wrong and what to do."""


@dataclass
class AdapterFiles:
    """A validated adapter: tensors under our keys ('transformer.h.0.attn.c_attn.lora_A.weight')."""
    state: dict[str, torch.Tensor]
    lcfg: LoraConfig
    base_id: str | None
    meta: dict = field(default_factory=dict)  # studio.json, {} when absent
    peft: dict = field(default_factory=dict)  # adapter_config.json as found

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {keys.peft_key(k): v.contiguous() for k, v in self.state.items()}


def read_adapter(source, cfg: GPTConfig | None = None, base_id: str | None = None,
                 config_path=None, max_bytes: int = MAX_FILE_BYTES) -> AdapterFiles:
    """Validate and read an adapter folder, or a .safetensors file with adapter_config.json beside it.

    cfg: the loaded base's shape (layer count and widths are checked against it); without it
    the widths must agree with each other. base_id: the loaded base's name, compared with the
    adapter's `base_model_name_or_path` when both name a known GPT-2 size.
    """
    weights, config_file, meta_file = locate(source, config_path)
    check_safetensors(weights, max_bytes)
    peft = read_json(config_file, "adapter config")
    r, alpha, dropout, listed, adapter_base = parse_config(peft, config_file)
    rs, rank_pattern, alpha_pattern = parse_variants(peft, config_file, r, alpha)
    if rs and not (rank_pattern or alpha_pattern):  # one scale: the same update as alpha' = alpha * sqrt(r)
        alpha, rs = alpha * math.sqrt(r), False
    check_base(adapter_base, cfg, base_id)
    against = "the loaded base"
    if cfg is None and preset_of(adapter_base):  # no base given: hold it to the GPT-2 size it names
        cfg, against = PRESETS[preset_of(adapter_base)], f"its recorded base {adapter_base}"
    probe = LoraConfig(r=r, alpha=alpha, rank_pattern=rank_pattern)
    expect = (lambda module: patterns.rank_alpha(probe, module)[0]) if rank_pattern else None
    names, rank, targets = check_header(weights, cfg, against, expect)
    check_variant(peft.get("use_dora", False), names, config_file.name, weights.name)
    if not rank_pattern and rank != r:
        raise AdapterError(f"{config_file.name} says r={r} but the tensors in {weights.name} have rank {rank}; "
                           f"the config does not belong to these weights.")
    if listed is not None:
        extra = [t for t in targets if t not in listed]
        if extra:
            raise AdapterError(f"{weights.name} has weights for {extra[0]} but {config_file.name} does not list it "
                               f"in target_modules ({', '.join(listed) or 'empty'}); the files do not match.")
    lcfg = LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=targets, use_rslora=rs,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=bool(peft.get("use_dora")))
    try:
        # without a base, the file's own deepest layer bounds the modules a pattern may name
        depth = cfg.n_layer if cfg is not None else 1 + max(keys.parse(k).layer for k in names.values())
        patterns.check_patterns(lcfg, depth, MAX_RANK, MAX_LOADED_ALPHA)
    except ValueError as e:
        raise AdapterError(f"{config_file.name}: {e}") from None
    state = read_values(weights, names)
    meta = read_record(meta_file.parent) if meta_file else {}
    return AdapterFiles(state, lcfg, adapter_base, meta, peft)


def locate(source, config_path=None) -> tuple[Path, Path, Path | None]:
    """(weights, config, studio.json or None) for a folder or a single .safetensors file."""
    src = Path(source)
    if src.is_dir():
        weights = src / WEIGHTS
        if not weights.is_file():
            pickled = [p.name for p in sorted(src.iterdir()) if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise AdapterError(f"{src.name}/ holds {pickled[0]} but no {WEIGHTS}: {PICKLE_HINT}")
            raise AdapterError(f"{src} has no {WEIGHTS}; an adapter folder holds {WEIGHTS} and {CONFIG}.")
        folder = src
    elif src.is_file():
        if src.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterError(f"{src.name}: {PICKLE_HINT}")
        if src.suffix.lower() != ".safetensors":
            raise AdapterError(f"{src.name}: only .safetensors adapter files (or a folder/.zip of one) are accepted.")
        weights, folder = src, src.parent
    else:
        raise AdapterError(f"no adapter file or folder at {src}.")
    config = Path(config_path) if config_path else folder / CONFIG
    if not config.is_file():
        raise AdapterError(f"{CONFIG} is missing beside {weights.name}; it says the rank, alpha and target "
                           f"modules, and PEFT writes it next to the weights.")
    meta = folder / META
    return weights, config, (meta if meta.is_file() else None)


def check_safetensors(path: Path, max_bytes: int = MAX_FILE_BYTES) -> None:
    """File size, pickle magic, and the raw header length, before safetensors parses anything."""
    size = path.stat().st_size
    if size > max_bytes:
        raise AdapterError(f"{path.name} is {size / 2**20:.1f} MiB, over the {max_bytes / 2**20:.0f} MiB limit "
                           f"for adapters; a LoRA adapter of GPT-2 is a few MiB.")
    with open(path, "rb") as f:
        head = f.read(9)
        # torch.save writes a zip, or a pickle from protocol 2 on ('\x80' + protocol); a safetensors
        # header length can start with the same bytes, but its JSON header then opens at byte 8
        zip_or_pickle = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05")
        if zip_or_pickle and head[8:9] != b"{":
            raise AdapterError(f"{path.name} is a PyTorch pickle (torch.save), not safetensors: {PICKLE_HINT}")
        head = head[:8]
        f.seek(8)
        if len(head) < 8:
            raise AdapterError(f"{path.name} is truncated: {size} bytes is too short for a safetensors file.")
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER_BYTES:
            raise AdapterError(f"{path.name}: the safetensors header claims {n} bytes, over the "
                               f"{MAX_HEADER_BYTES} byte limit for an adapter; the file is corrupt or hostile.")
        if n > size - 8:
            raise AdapterError(f"{path.name} is truncated: its header needs {n} bytes but only {size - 8} follow.")
        raw = f.read(n)
    end = _header_end(_parse_header(raw, path.name), path.name)
    if 8 + n + end > size:
        raise AdapterError(f"{path.name} is truncated: tensor data should end at byte {8 + n + end} "
                           f"but the file has {size} bytes.")


def _parse_header(raw: bytes, name: str) -> dict:
    """The JSON header, its key count and key names checked before safetensors sees it."""
    try:
        header = safe_json.loads(raw, "header")
    except ValueError as e:
        why = "nested too deeply" if "nested too deeply" in str(e) else "not JSON"
        raise AdapterError(f"{name} is not a safetensors file (its header is {why}).") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{name} is not a safetensors file (its header is not a JSON object).")
    names = [k for k in header if k != "__metadata__"]
    if len(names) > MAX_TENSORS:
        raise AdapterError(f"{name} holds {len(names)} tensors; an adapter of GPT-2 holds at most 576 "
                           f"(48 layers x 4 projections x A, B and a DoRA magnitude). The file is not a LoRA adapter.")
    for k in names:
        if keys.parse(k, in_file=True) is None:
            raise AdapterError(f"{name}: {keys.unexpected(k)}")
    return header


def _header_end(header: dict, name: str) -> int:
    """Where the tensor data ends according to the header (offsets checked to be sane integers)."""
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        offsets = v.get("data_offsets") if isinstance(v, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(is_whole(o, 0, 2**63 - 1) for o in offsets)
                or offsets[0] > offsets[1]):
            raise AdapterError(f"{name}: key {k!r} has no valid data_offsets in the header (two whole numbers, "
                               f"start <= end).")
        end = max(end, offsets[1])
    return end


def read_json(path: Path, what: str) -> dict:
    try:
        data = safe_json.load_file(path, MAX_JSON_BYTES)
    except ValueError as e:
        raise AdapterError(f"{path.name} ({what}) {str(e).removeprefix(path.name + ' ')}.") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path.name} ({what}) must be a JSON object.")
    return data


def read_record(folder: Path) -> dict:
    """The adapter's studio.json as found (run_record.load); its history is read apart, line by line."""
    try:
        return run_record.load(folder)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{META} (studio metadata) {str(e).removeprefix(META + ' ')}.") from None


def parse_config(c: dict, path: Path):
    """(r, alpha, dropout, listed targets or None, base id) from adapter_config.json."""
    where = path.name
    if c.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type is {c.get('peft_type')!r}; only LoRA adapters are supported.")
    r = c.get("r")
    if not is_whole(r, 1, MAX_RANK):
        raise AdapterError(f"{where}: r must be a whole number from 1 to {MAX_RANK} (got {r!r}).")
    alpha = c.get("lora_alpha", 8)
    if safe_json.number(alpha, 0, MAX_LOADED_ALPHA) is None or alpha <= 0:
        raise AdapterError(f"{where}: lora_alpha must be a positive number up to {MAX_LOADED_ALPHA:g} (got {alpha!r}); "
                           f"adapters use about 1-2 x the rank.")
    dropout = c.get("lora_dropout") or 0.0
    if not is_real(dropout, 0, 1) or dropout == 1:
        raise AdapterError(f"{where}: lora_dropout must be in [0, 1) (got {dropout!r}).")
    if not isinstance(c.get("use_dora", False), bool):
        raise AdapterError(f"{where}: use_dora must be true or false (got {c.get('use_dora')!r}).")
    for flag, what in (("lora_bias", "LoRA biases"), ("layer_replication", "layer replication")):
        if c.get(flag):
            raise AdapterError(f"{where}: {what} ({flag}) is not supported; use a plain LoRA adapter.")
    if c.get("bias", "none") != "none":
        raise AdapterError(f"{where}: bias={c.get('bias')!r} is not supported; only bias='none' adapters.")
    if c.get("modules_to_save"):
        raise AdapterError(f"{where}: modules_to_save is not supported (only LoRA A/B weights are loaded).")
    if c.get("use_rslora") and alpha * math.sqrt(r) > MAX_LOADED_ALPHA:  # checked as saved (alpha x sqrt r)
        raise AdapterError(f"{where}: with use_rslora, lora_alpha x sqrt(r) = {alpha * math.sqrt(r):g} is over "
                           f"{MAX_LOADED_ALPHA:g}; adapters use about 1-2 x the rank.")
    base = c.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise AdapterError(f"{where}: base_model_name_or_path must be a string (got {type(base).__name__}).")
    listed = None
    tm = c.get("target_modules")
    if isinstance(tm, list):  # a str is a regex in PEFT: the keys decide then
        try:
            listed = normalize_targets([str(t) for t in tm])
        except ValueError as e:
            raise AdapterError(f"{where}: {e}") from None
    return r, float(alpha), float(dropout), listed, (base or None)


def parse_variants(c: dict, path: Path, r: int, alpha: float) -> tuple[bool, dict, dict]:
    """(use_rslora, rank_pattern, alpha_pattern) from adapter_config.json, their kinds checked (which
    modules they name is checked once the targets are known)."""
    rs = c.get("use_rslora", False)
    if not isinstance(rs, bool):
        raise AdapterError(f"{path.name}: use_rslora must be true or false (got {rs!r}).")
    pats = []
    for key in ("rank_pattern", "alpha_pattern"):
        p = c.get(key) or {}
        if not isinstance(p, dict):
            raise AdapterError(f"{path.name}: {key} must be a JSON object of module pattern -> value "
                               f"(got {type(p).__name__}).")
        pats.append(dict(p))
    probe = LoraConfig(r=r, alpha=alpha, rank_pattern=pats[0], alpha_pattern=pats[1])
    try:
        patterns.check_patterns(probe, None, MAX_RANK, MAX_LOADED_ALPHA)
    except ValueError as e:
        raise AdapterError(f"{path.name}: {e}") from None
    return rs, pats[0], pats[1]


def preset_of(base_id: str | None) -> str | None:
    """'gpt2' for 'gpt2' or 'openai-community/gpt2'; None for paths and unknown ids."""
    if not base_id:
        return None
    if base_id in PRESETS:
        return base_id
    return next((k for k, v in HUB_IDS.items() if v == base_id), None)


def check_base(adapter_base: str | None, cfg: GPTConfig | None, base_id: str | None) -> None:
    """The adapter's recorded base must fit the loaded one when either is a known GPT-2 size."""
    a = preset_of(adapter_base)
    if a and cfg is not None:
        p = PRESETS[a]
        if (p.n_layer, p.n_embd, p.n_head) != (cfg.n_layer, cfg.n_embd, cfg.n_head):
            raise AdapterError(
                f"this adapter was made for {adapter_base} ({p.n_layer} layers, width {p.n_embd}) but the loaded "
                f"base has {cfg.n_layer} layers and width {cfg.n_embd}; load {adapter_base} first.")
    b = preset_of(base_id)
    if a and b and a != b:
        raise AdapterError(f"this adapter was made for {adapter_base} but the loaded base is {base_id}; "
                           f"load {adapter_base} first.")


def check_header(path: Path, cfg: GPTConfig | None, against: str = "the loaded base",
                 expect=None) -> tuple[dict[str, str], int, tuple[str, ...]]:
    """Names, dtypes and shapes from the header: ({file key: our key}, rank, targets).
    `against` names `cfg` in messages; `expect(module)`, when given, is each module's rank (rank_pattern)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            info = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for malformed headers
        raise AdapterError(f"{path.name} could not be read as safetensors ({str(e)[:200]}).") from None
    if not info:
        raise AdapterError(f"{path.name} holds no tensors; an adapter holds lora_A/lora_B weights.")
    try:
        slots = keys.modules(info, in_file=True)  # every key parsed, A/B pairs complete, no key twice
    except ValueError as e:
        raise AdapterError(f"{path.name}: {e}") from None
    names = {}
    for (i, target), found in slots.items():
        if cfg is not None and i >= cfg.n_layer:
            raise AdapterError(f"{path.name}: key {next(iter(found.values()))!r} is for layer {i} but {against} has "
                               f"{cfg.n_layer} layers (0..{cfg.n_layer - 1}); the adapter was made for a deeper model.")
        for part, k in found.items():
            _check_kind(path.name, k, part, info[k])
            names[k] = keys.key(i, target, part)
    rank = _check_shapes(path.name, slots, info, cfg, against, expect)
    targets = keys.targets(slots)
    return names, rank, targets


def _check_kind(file: str, k: str, part: str, dtype_shape) -> None:
    """One tensor's dtype and number of dimensions."""
    dtype, shape = dtype_shape
    if dtype not in DTYPES:
        raise AdapterError(f"{file}: key {k!r} has dtype {dtype}; adapter weights must be {', '.join(DTYPES)}.")
    if part == keys.MAGNITUDE and len(shape) != 1:
        raise AdapterError(f"{file}: key {k!r} has shape {list(shape)}; a DoRA magnitude vector is 1-D "
                           f"(one value per output feature).")
    if part != keys.MAGNITUDE and len(shape) != 2:
        raise AdapterError(f"{file}: key {k!r} has shape {list(shape)}; LoRA weights are 2-D matrices.")


def _check_shapes(file: str, slots: dict, info: dict, cfg: GPTConfig | None, against: str, expect):
    """The rank: one for all modules (or each module's expected one), every shape fitting the model's width."""
    rank, first = None, None
    width = cfg.n_embd if cfg is not None else None
    for (i, target), found in slots.items():
        ka, kb = found[keys.A], found[keys.B]
        sa, sb = info[ka][1], info[kb][1]
        r = sa[0]
        if not 1 <= r <= MAX_RANK:
            raise AdapterError(f"{file}: key {ka!r} has rank {r} (shape {list(sa)}); the rank must be 1..{MAX_RANK}.")
        if expect is not None and r != expect(keys.module(i, target)):
            raise AdapterError(f"{file}: key {ka!r} has rank {r} but the config's r/rank_pattern give "
                               f"{expect(keys.module(i, target))} for {keys.module(i, target)}; the config does not "
                               f"belong to these weights.")
        if rank is None:
            rank, first = r, ka
        elif r != rank and expect is None:
            raise AdapterError(f"{file}: key {ka!r} has rank {r} but {first!r} has rank {rank}; an adapter "
                               f"must use a single rank.")
        if width is None:  # no base given: the first A matrix sets the width the others must match
            width = width_from_a(target, sa)
        fan_in, fan_out = target_shapes(GPTConfig(n_layer=1, n_head=1, n_embd=width))[target]
        for k, shape, want, what in ((ka, sa, (r, fan_in), "r x in"), (kb, sb, (fan_out, r), "out x r")):
            if shape != want:
                base = against if cfg is not None else "the other weights"
                raise AdapterError(f"{file}: key {k!r} has shape {list(shape)}, expected {list(want)} "
                                   f"({what} for {target} of width {width}, as in {base}).")
        km = found.get(keys.MAGNITUDE)
        if km is not None and info[km][1] != (fan_out,):
            raise AdapterError(f"{file}: key {km!r} has shape {list(info[km][1])}, expected [{fan_out}] "
                               f"(one magnitude per output feature of {target} of width {width}).")
    return rank


def check_variant(use_dora: bool, names: dict[str, str], config_name: str, weights_name: str) -> None:
    """Every module holds the tensors of the variant adapter_config.json names (DoRA: a magnitude vector beside
    every A/B pair; plain LoRA: none)."""
    variant = variants.of(LoraConfig(use_dora=use_dora))
    says = f"{config_name} {'sets' if use_dora else 'does not set'} use_dora"
    for (i, target), found in keys.modules(names.values()).items():
        missing = [p for p in variant.parts if p not in found]
        if missing:
            raise AdapterError(f"{weights_name}: {keys.peft_key(keys.key(i, target, missing[0]))!r} is missing; "
                               f"{says}, and a {variant.label} adapter has {', '.join(variant.parts)} for every "
                               f"target.")
        extra = [p for p in found if p not in variant.parts]
        if extra:
            raise AdapterError(f"{weights_name} holds {keys.peft_key(found[extra[0]])!r}, which a {variant.label} "
                               f"adapter does not have; {says}, so the files do not match.")


def read_values(path: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors (stored dtype, our keys), each checked to be finite."""
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k, ours in names.items():
            t = f.get_tensor(k)
            check_values(t, f"{path.name}: key {k!r}")
            out[ours] = t
    return out


def check_values(t: torch.Tensor, where: str, advice: str = "") -> None:
    """Finite, and no |value| over MAX_VALUE (an adapter, a blend's result); `advice` ends the message."""
    advice = advice or "the adapter is broken or hostile and cannot be used"
    if not bool(torch.isfinite(t).all()):
        raise AdapterError(f"{where} contains NaN or infinite values (a diverged training run?); {advice}.")
    top = float(t.abs().max()) if t.numel() else 0.0
    if top > MAX_VALUE:
        raise AdapterError(f"{where} has values up to {top:.3g}, over the limit of {MAX_VALUE:g} (a trained "
                           f"LoRA stays far below it); {advice}.")
