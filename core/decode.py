"""Static decoding: fixed buffers for one decode step, replayed as a CUDA graph on GPUs.

Python launches ~15 kernels per block per token; at batch 1 on a GPU that launch time, not the
math, bounds decoding. A captured graph replays the whole step with one launch. The buffers
(KV cache, token, position, mask, write index) stay at fixed addresses, so each decoder is
reused across calls of the same shape and adapter mix, one call at a time.
"""
from __future__ import annotations

import threading

import torch

from .device import GUARD
from .model import GPT, KVCache

_POOL_LOCK = threading.Lock()


MAX_DECODERS = 8  # cached decoders per model (each holds a KV cache)


class StaticDecoder:
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

    def start(self, offsets: torch.Tensor) -> None:
        """A new call: row i's position is offsets[i] + its cache index (left padding shifts it)."""
        self.offset.copy_(offsets.view(-1, 1))

    def _forward(self) -> torch.Tensor:
        # everything that depends on the step is computed here, inside the graph
        self.valid.index_fill_(1, self.write_at, True)
        torch.add(self.offset, self.write_at, out=self.pos)
        # an additive mask made once per step (a boolean one is converted again in every layer)
        mask = torch.zeros(self.valid.shape, dtype=self.model.dtype, device=self.valid.device)
        mask = mask.masked_fill_(~self.valid, float("-inf"))[:, None, None, :]
        return self.model(self.tok, self.route, self.cache, self.write_at, pos=self.pos, mask=mask)

    def step(self, tokens: torch.Tensor, at: int) -> torch.Tensor:
        """Logits (B, 1, V) for `tokens` (B,) written at cache index `at`."""
        self.tok.copy_(tokens.view(-1, 1))
        self.write_at.fill_(at)
        if not self.use_graph:
            return self._forward()
        self.graph.replay()
        return self.out

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


def release(decoder: StaticDecoder) -> None:
    decoder.busy.release()
