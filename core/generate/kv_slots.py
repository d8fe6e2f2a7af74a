"""The KV slot manager: one preallocated pool of keys and values, a slot per running row.

A slot holds one row's keys and values, from position 0 (its prompt) to its last token. Rows that run
are kept in the lowest slots (`compact` moves a row down into a hole left by a finished one), so a decode
step of n rows reads slots 0..n-1 as one view, and a batch padded up to a bucket of b rows uses the free
slots n..b-1 for its dummy rows. Attention reads the pool through the two views below, the one cache
protocol of `core.model.gpt.Attention`: `write(layer, k, v)` stores the new keys/values and returns the
keys/values to attend over.
"""
from __future__ import annotations

import torch

from core.device import available_memory
from core.model.gpt import GPT


def pool_rows(model: GPT, max_len: int, memory: int | None = None, share: float = 0.25, most: int = 64) -> int:
    """Slots for a KV pool of `max_len` tokens each: `share` of the memory a new allocation can get
    on the model's device (the rest stays for activations, logits and training jobs), at most `most`,
    at least 1; 16 when the free memory is unknown. memory: bytes available (default: measured)."""
    cfg = model.config
    slot = 2 * cfg.n_layer * cfg.n_head * max_len * cfg.head_dim * model.dtype.itemsize  # keys + values
    memory = available_memory(model.device) if memory is None else memory
    if memory is None:
        return 16
    return max(1, min(most, int(memory * share) // slot))


def crop_prompt(prompt, max_new: int, max_len: int) -> list[int]:
    """The one prompt-cropping rule: keep the prompt's last tokens so prompt + `max_new` fit `max_len`."""
    return list(prompt)[-(max_len - max_new):]


class KVSlots:
    """Keys and values (n_layer, rows, n_head, max_len, head_dim), and which slots are free."""

    def __init__(self, model: GPT, rows: int, max_len: int):
        cfg = model.config
        self._shape = (cfg.n_layer, rows, cfg.n_head, max_len, cfg.head_dim)
        self._device, self._dtype = model.device, model.dtype
        # made at the first row: a base's work loop that only trains or evaluates holds no pool
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.rows, self.max_len = rows, max_len
        self._free = list(range(rows))

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """The n lowest free slots (raises if fewer are free)."""
        if n > len(self._free):
            raise RuntimeError(f"{n} KV slots asked for, {len(self._free)} free")
        if self.k is None:  # zeros, not empty: masked positions enter attention with weight 0, and 0 * NaN is NaN
            self.k = torch.zeros(self._shape, device=self._device, dtype=self._dtype)
            self.v = torch.zeros(self._shape, device=self._device, dtype=self._dtype)
        out, self._free = self._free[:n], self._free[n:]
        return out

    def release(self, slots) -> None:
        self._free = sorted(self._free + list(slots))

    def compact(self, used: dict[int, int]) -> dict[int, int]:
        """Move the rows in `used` (slot -> tokens it holds) into the lowest slots; returns old -> new slot
        for each row that moved (its keys/values were copied)."""
        n = len(used)
        holes = iter(s for s in range(n) if s not in used)
        moves = {s: next(holes) for s in sorted(used) if s >= n}
        for old, new in moves.items():
            length = used[old]
            self.k[:, new, :, :length] = self.k[:, old, :, :length]
            self.v[:, new, :, :length] = self.v[:, old, :, :length]
        if moves:
            self._free = sorted(set(self._free) - set(moves.values()) | set(moves))
        return moves


class PrefillView:
    """A prefill of R rows of one prompt (T tokens) into `slots`: writes positions 0..T-1 and attends over
    the prompt itself (causal, no mask)."""

    def __init__(self, kv: KVSlots, slots: list[int]):
        self.kv = kv
        self.slots = torch.tensor(slots, device=kv.k.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        T = k.shape[2]
        self.kv.k[layer, self.slots, :, :T] = k
        self.kv.v[layer, self.slots, :, :T] = v
        return k, v


class DecodeView:
    """One decode step: row b writes its token's keys/values at position pos[b] of its slot and attends
    over the slot's first `length` positions (`decode_mask` hides those past its own). The rows sit in
    slots 0..rows-1 (a view of the pool; the tensors are all made here, so a CUDA graph can capture the
    step), or in `slots` (a copy: a retry of some rows alone)."""

    def __init__(self, kv: KVSlots, pos: torch.Tensor, length: int, slots: list[int] | None = None):
        self.kv, self.pos, self.length = kv, pos, length
        self.at = pos.view(-1, 1, 1, 1)  # row b's position, shaped to scatter its keys/values
        self.slots = None if slots is None else torch.tensor(slots, device=pos.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.slots is not None:
            self.kv.k[layer, self.slots, :, self.pos] = k[:, :, 0]
            self.kv.v[layer, self.slots, :, self.pos] = v[:, :, 0]
            return self.kv.k[layer, self.slots, :, :self.length], self.kv.v[layer, self.slots, :, :self.length]
        pk, pv = self.kv.k[layer, :len(self.pos)], self.kv.v[layer, :len(self.pos)]
        at = self.at.expand(-1, k.shape[1], 1, k.shape[3])  # a scatter: no host sync, so a graph captures it
        pk.scatter_(2, at, k)
        pv.scatter_(2, at, v)
        return pk[:, :, :self.length], pv[:, :, :self.length]


def decode_mask(pos: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The one attention mask of a decode step: row b sees positions 0..pos[b] of its slot. Additive
    (B, 1, 1, length): made once per step (a boolean one is converted again in every layer)."""
    seen = torch.arange(length, device=pos.device)[None, :] <= pos[:, None]
    return torch.zeros(seen.shape, dtype=dtype, device=pos.device).masked_fill_(~seen, float("-inf"))[:, None, None]
