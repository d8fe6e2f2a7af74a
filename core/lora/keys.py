"""The one adapter key format: how each LoRA tensor is named, in the engine's state dicts and in files.

Ours: 'transformer.h.{layer}.{target}.{part}', part one of PARTS (lora_A is r x in, lora_B out x r,
DoRA's magnitude one value per output feature, saved by PEFT without '.weight'). Files add PEFT_PREFIX in
front. As found in a file the prefix is optional and PEFT's adapter-name infix ('lora_A.default.weight')
is tolerated; a layer index has no leading zeros, so that no two spellings of one weight pass.
Every reader and writer of adapter keys builds and parses them here.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple

from core.model.config import TARGET_MODULES

PEFT_PREFIX = "base_model.model."
A, B, MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
PARTS = (A, B, MAGNITUDE)

_TARGET = "|".join(re.escape(t) for t in TARGET_MODULES)
_KEY = re.compile(rf"^(?P<prefix>{re.escape(PEFT_PREFIX)})?transformer\.h\.(?P<layer>0|[1-9]\d*)\.(?P<target>{_TARGET})"
                  rf"\.(?:lora_(?P<ab>[AB])(?P<infix>\.default)?\.weight"
                  rf"|lora_magnitude_vector(?P<m_infix>\.default)?(?P<m_weight>\.weight)?)$")


class Key(NamedTuple):
    layer: int
    target: str  # one of TARGET_MODULES
    part: str  # one of PARTS


def module(layer: int, target: str) -> str:
    """'transformer.h.{layer}.{target}': the wrapped projection's name (PEFT matches its patterns on it)."""
    return f"transformer.h.{layer}.{target}"


def key(layer: int, target: str, part: str) -> str:
    """Our key of one tensor: 'transformer.h.0.attn.c_attn.lora_A.weight'."""
    return f"{module(layer, target)}.{part}"


def peft_key(ours: str) -> str:
    """The key a PEFT file holds for our key `ours`."""
    return PEFT_PREFIX + ours


def parse(k: str, in_file: bool = False) -> Key | None:
    """The tensor `k` names, or None when it is no adapter key. in_file: a file's spellings (PEFT's prefix,
    its '.default' infix, a magnitude's '.weight') are accepted too."""
    m = _KEY.match(k) if isinstance(k, str) else None
    if m is None or (not in_file and any(m.group(g) for g in ("prefix", "infix", "m_infix", "m_weight"))):
        return None
    part = {"A": A, "B": B, None: MAGNITUDE}[m.group("ab")]
    return Key(int(m.group("layer")), m.group("target"), part)


def targets(slots: Iterable[tuple[int, str]]) -> tuple[str, ...]:
    """The targets that (layer, target) `slots` (the keys of `modules`) hold, in TARGET_MODULES order."""
    found = {t for _, t in slots}
    return tuple(t for t in TARGET_MODULES if t in found)


def unexpected(k) -> str:
    """Why `k` may not be in an adapter file (for a key `parse` refused)."""
    return (f"unexpected key {str(k)[:120]!r}; an adapter may only hold lora_A/lora_B weights of "
            f"transformer.h.<layer>.({'|'.join(TARGET_MODULES)}).")


def ours(k: str) -> str:
    """Our key of `k` as a file spells it ('base_model.model.' and PEFT's infixes dropped); ValueError for a
    key that is no adapter key."""
    p = parse(k, in_file=True)
    if p is None:
        raise ValueError(unexpected(k))
    return key(*p)


def modules(names: Iterable[str], in_file: bool = False) -> dict[tuple[int, str], dict[str, str]]:
    """{(layer, target): {part: key as given}} of `names`, sorted. ValueError (naming the key) for a key that
    is no adapter key, two keys of one tensor, or a lora_A without its lora_B (or the reverse)."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for k in sorted(names):
        p = parse(k, in_file)
        if p is None:
            raise ValueError(unexpected(k))
        slot = found.setdefault((p.layer, p.target), {})
        if p.part in slot:
            raise ValueError(f"key {k!r} duplicates another key for the same weight.")
        slot[p.part] = k
    for parts in found.values():
        if (A in parts) != (B in parts):
            given, missing = (parts[A], "lora_B") if A in parts else (parts[B], "lora_A")
            raise ValueError(f"key {given!r} has no matching {missing}; LoRA weights come in A/B pairs.")
        if A not in parts:
            raise ValueError(f"key {next(iter(parts.values()))!r} has no matching lora_A and lora_B; "
                             f"LoRA weights come in A/B pairs.")
    return dict(sorted(found.items()))
