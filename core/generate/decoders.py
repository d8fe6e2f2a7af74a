"""Decoders: one interface, two kinds, picked once per generation call by `open_decoder`.

A decoder holds a call's KV cache. `start(prompts)` runs the prompts (left-padded to the longest)
into it and returns the logits of their last position; `step(tokens, at)` writes one token per
row at cache index `at` and returns the next logits; `close()` ends the call.

- DynamicDecoder: a cache sized to the call, attention over the filled part only (CPU, MPS).
- StaticDecoder: fixed buffers for one decode step, replayed as a CUDA graph on GPUs. Python
  launches ~15 kernels per block per token; at batch 1 on a GPU that launch time, not the math,
  bounds decoding. A captured graph replays the whole step with one launch. The buffers (KV cache,
  token, position, mask, write index) stay at fixed addresses, so each static decoder is reused
  across calls of the same shape and adapter mix, one call at a time.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch

from core.model.config import EOT_TOKEN
from core.device import GUARD
from core.model.gpt import GPT, KVCache, causal_mask

_POOL_LOCK = threading.Lock()
MAX_DECODERS = 8  # cached static decoders per model (each holds a KV cache)
BUCKET = 256  # static caches are sized in multiples of this, so repeated calls reuse one graph


def open_decoder(model: GPT, route, key, batch: int, length: int, static: bool | None = None):
    """The decoder for one call of `batch` rows and up to `length` tokens (prompt + new ones).

    static: fixed buffers (default on CUDA, where each step replays a CUDA graph); otherwise a
    DynamicDecoder. `key` names the adapter mix `route` serves (static decoders are pooled by it).
    Call `close()` on the decoder when the call ends.
    """
    cuda = model.device.type == "cuda"
    if not (cuda if static is None else static):
        return DynamicDecoder(model, route, batch, length)
    max_len = min(model.config.block_size, -(-length // BUCKET) * BUCKET)
    dec = acquire(model, route, key, batch, max_len, graph=cuda)
    try:
        dec.prepare()
    except BaseException:
        dec.close()
        raise
    return dec


class _Decoder:
    """The prefill both kinds share; subclasses make `cache`, `valid` (B, max_len) and `step`."""
    model: GPT
    route: object
    batch: int
    cache: KVCache
    valid: torch.Tensor  # which cache positions hold a token (False: left padding, not yet written)

    def start(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """A new call: the prompts' keys and values into the cache; logits (B, 1, V) of each row's
        last prompt token. The longest prompt has T tokens; the first new token goes at index T."""
        model, dev, B = self.model, self.model.device, self.batch
        T = max(len(p) for p in prompts)
        padded = any(len(p) != T for p in prompts)
        self.valid.zero_()
        idx = torch.full((B, T), EOT_TOKEN, dtype=torch.long, device=dev)
        for i, p in enumerate(prompts):
            idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
            self.valid[i, T - len(p):T] = True
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        self._begin(lengths, T, padded)
        if padded:
            pos = (self.valid[:, :T].long().cumsum(-1) - 1).clamp_min(0)
            return model(idx, self.route, self.cache, 0, pos=pos, mask=causal_mask(T, 0, dev, self.valid),
                         last_only=True)
        return model(idx, self.route, self.cache, 0, last_only=True)

    def _begin(self, lengths: torch.Tensor, T: int, padded: bool) -> None:
        """Remember what the steps of this call need (row i's prompt has lengths[i] tokens)."""

    def step(self, tokens: torch.Tensor, at: int) -> torch.Tensor:
        """Logits (B, 1, V) for `tokens` (B,) written at cache index `at`."""
        raise NotImplementedError

    def close(self) -> None:
        """The call is over (a pooled decoder becomes free for the next one)."""


class DynamicDecoder(_Decoder):
    """A cache made for this call: each step attends over the filled positions only."""

    def __init__(self, model: GPT, route, batch: int, max_len: int):
        dev = model.device
        self.model, self.route, self.batch = model, route, batch
        self.cache = KVCache(model.config, batch, max_len, dev, model.dtype)
        self.valid = torch.zeros((batch, max_len), dtype=torch.bool, device=dev)

    def _begin(self, lengths: torch.Tensor, T: int, padded: bool) -> None:
        self.lengths, self.T, self.padded = lengths, T, padded

    def step(self, tokens: torch.Tensor, at: int) -> torch.Tensor:
        B, dev = self.batch, self.model.device
        if not self.padded:
            return self.model(tokens.view(B, 1), self.route, self.cache, at)
        self.valid[:, at] = True  # left-padded rows: explicit positions and a mask over the padding
        pos = (self.lengths + (at - self.T)).view(B, 1)
        return self.model(tokens.view(B, 1), self.route, self.cache, at, pos=pos,
                          mask=causal_mask(1, at, dev, self.valid))


class StaticDecoder(_Decoder):
    """Fixed buffers attended over whole (a mask hides the unfilled part), pooled by `acquire`."""

    def __init__(self, model: GPT, route, batch: int, max_len: int, graph: bool):
        dev, cfg = model.device, model.config
        self.model, self.route, self.batch, self.max_len = model, route, batch, max_len
        self.cache = KVCache(cfg, batch, max_len, dev, model.dtype)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        self.write_at = torch.zeros(1, dtype=torch.long, device=dev)
        self.offset = torch.zeros(batch, 1, dtype=torch.long, device=dev)  # row position = offset + write_at
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.busy = threading.Lock()

    def _begin(self, lengths: torch.Tensor, T: int, padded: bool) -> None:
        # row i's position is its cache index minus its left padding (T - lengths[i])
        self.offset.copy_((lengths - T).view(-1, 1))

    def _forward(self) -> torch.Tensor:
        # everything that depends on the step is computed here, inside the graph
        self.valid.index_fill_(1, self.write_at, True)
        torch.add(self.offset, self.write_at, out=self.pos)
        # an additive mask made once per step (a boolean one is converted again in every layer)
        mask = torch.zeros(self.valid.shape, dtype=self.model.dtype, device=self.valid.device)
        mask = mask.masked_fill_(~self.valid, float("-inf"))[:, None, None, :]
        return self.model(self.tok, self.route, self.cache, self.write_at, pos=self.pos, mask=mask)

    def step(self, tokens: torch.Tensor, at: int) -> torch.Tensor:
        self.tok.copy_(tokens.view(-1, 1))
        self.write_at.fill_(at)
        if not self.use_graph:
            return self._forward()
        self.graph.replay()
        return self.out

    def close(self) -> None:
        self.busy.release()

    def prepare(self) -> None:
        """Capture the graph if this decoder has none yet (call holding no GUARD; it takes it alone).
        The warm-up writes cache slot 0, which the prompt's prefill overwrites afterwards."""
        if self.use_graph and self.graph is None:
            with GUARD.exclusive():
                self._capture()

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and cuBLAS handles), then capture. The warm-up
        # writes into cache slot `at` (marking it valid), which the real step does anyway.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        # GUARD keeps other threads' GPU work out; thread_local checks only this thread's calls
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.out = self._forward()


def acquire(model: GPT, route, key, batch: int, max_len: int, graph: bool) -> StaticDecoder:
    """A free decoder for this shape and adapter mix (made and cached if none is free).

    `key` names the adapter mix; the model's adapter version is added so a graph never reads
    tensors of an adapter that was removed or replaced.
    """
    full_key = (key, batch, max_len, getattr(model, "lora_version", 0), graph)
    with _POOL_LOCK:
        pool: dict = model.__dict__.setdefault("_decoders", {})
        for d in pool.get(full_key, []):
            if d.busy.acquire(blocking=False):
                if hasattr(d.route, "refresh"):
                    d.route.refresh()  # adapters may have been trained since
                return d
        for k in [k for k in pool if k[3] != full_key[3]]:  # stale adapter versions
            del pool[k]
        if sum(len(v) for v in pool.values()) >= MAX_DECODERS:
            pool.pop(next(iter(pool)))
        d = StaticDecoder(model, route, batch, max_len, graph)
        d.busy.acquire()
        pool.setdefault(full_key, []).append(d)
        return d
