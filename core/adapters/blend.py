"""Blending LoRA adapters exactly: a weighted sum of updates is itself a LoRA of higher rank.

delta_k = s_k * B_k @ A_k. Stacking the A's and placing the B's side by side with w_k * s_k
folded in gives B @ A = sum_k w_k * s_k * B_k @ A_k, so with scaling 1 (alpha = r) the blend's
update is the weighted sum of the updates, up to float rounding. A projection that an adapter
does not target contributes zero rows/columns, so one rank holds over the union of targets.
"""
from __future__ import annotations

from typing import Sequence

import torch

from core.checks import is_real
from core.adapters.validate import AdapterError, check_values
from core.lora import keys, variants
from core.lora.config import MAX_RANK, LoraConfig

MAX_WEIGHT = 100.0  # a weight of 1 is the adapter's full effect; 1e300 only overflows the result


def blend_states(parts: Sequence[tuple[dict[str, torch.Tensor], LoraConfig]],
                 weights: Sequence[float]) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The blended adapter's fp32 tensors (our keys) and its LoraConfig (r = sum of ranks, alpha = r)."""
    if not parts:
        raise AdapterError("choose at least one adapter to blend.")
    odd = next((variants.of(lcfg) for _, lcfg in parts if not variants.of(lcfg).low_rank), None)
    if odd is not None:  # e.g. DoRA: each update is rescaled by its own weight norm
        raise AdapterError(f"{odd.label} adapters cannot be blended: a weighted sum of {odd.label} updates is not "
                           f"one LoRA update; blend plain LoRA adapters only.")
    if len(parts) != len(weights):
        raise AdapterError(f"give one weight per adapter ({len(parts)} adapters, {len(weights)} weights).")
    ws = []
    for w in weights:
        if not is_real(w, -MAX_WEIGHT, MAX_WEIGHT):
            raise AdapterError(f"blend weights must be finite numbers from -{MAX_WEIGHT:g} to {MAX_WEIGHT:g} "
                               f"(got {w!r}); 1 keeps an adapter's full effect.")
        ws.append(float(w))
    rank = sum(lcfg.r for _, lcfg in parts)
    if rank > MAX_RANK:
        raise AdapterError(f"the blend would have rank {rank} (the sum of the ranks), over the limit of {MAX_RANK}; "
                           f"blend fewer or lower-rank adapters.")
    slots = {}  # (layer, target) -> fan-in from whichever adapter has it
    for state, _ in parts:
        try:
            found = keys.modules(state)
        except ValueError as e:
            raise AdapterError(str(e)) from None
        for slot, names in found.items():
            slots.setdefault(slot, state[names[keys.A]].shape[1])
    out = {}
    for (i, target), fan_in in sorted(slots.items()):
        key_a, key_b = keys.key(i, target, keys.A), keys.key(i, target, keys.B)
        fan_out = next(s[key_b].shape[0] for s, _ in parts if key_b in s)
        As, Bs = [], []
        for (state, lcfg), w in zip(parts, ws):
            A = state.get(key_a)
            if A is None:
                As.append(torch.zeros(lcfg.r, fan_in))
                Bs.append(torch.zeros(fan_out, lcfg.r))
                continue
            As.append(A.float().cpu())
            Bs.append(state[key_b].float().cpu() * (w * lcfg.scaling))
        out[key_a] = torch.cat(As, 0).contiguous()
        out[key_b] = torch.cat(Bs, 1).contiguous()
    for t in out.values():  # the result is held to an imported adapter's bounds
        check_values(t, "the blend", "use smaller weights or blend other adapters")
    targets = keys.targets(slots)
    return out, LoraConfig(r=rank, alpha=float(rank), dropout=0.0, targets=targets)
