"""The model runner: the forward of a prefill and of a decode step over the KV slot pool.

Eager on CPU and MPS. On CUDA each decode step replays a CUDA graph: Python launches ~15 kernels per
block per token, and at small batches on a GPU that launch time, not the math, bounds decoding; a graph
replays the whole step with one launch. As in vLLM's model runner, one graph is captured per batch-size
bucket (1, 2, 4, 8, 16, 32, 64 rows) and attention length (a multiple of `LENGTH_STEP`), and a step of n
rows replays the smallest bucket that holds them, its extra rows dummies (token 0 at position 0 of a free
slot, their logits dropped). Captured steps read fixed buffers: tokens, positions, and each row's adapter
weights (`GraphRoute`, refilled when the rows' adapters change). If a capture fails, the runner says so
once (a warning in the log) and runs eagerly from then on.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Sequence

import torch

from core.device import GUARD
from core.generate.kv_slots import DecodeView, KVSlots, PrefillView, decode_mask
from core.lora.layers import Route, lora_layers, make_route
from core.model.gpt import GPT

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
LENGTH_STEP = 256  # captured steps attend over a multiple of this many positions


def buckets_for(rows: int) -> list[int]:
    """The batch sizes of a pool of `rows` slots: the standard buckets below it, and the pool itself."""
    return sorted({b for b in BUCKETS if b < rows} | {rows})


def cuda_graph(step: Callable[[], torch.Tensor], pool=None) -> Callable[[], torch.Tensor]:
    """Capture `step` as a CUDA graph; returns a function that replays it and gives its output tensor."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: allocator and cuBLAS handles, outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # GUARD keeps other threads' GPU work out; thread_local checks only this thread's calls
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out
    return replay


class GraphRoute:
    """Each row's adapter for a captured step: A (rows, in, r) and B (rows, r, out) per LoRA layer at
    fixed addresses (zero rows for the base), refilled in place by `fill`. The layers call `plan`
    (as they do a `core.lora.layers.Route`); no DoRA rows (`graphable` says when they are absent)."""

    def __init__(self, rows: int):
        self.names: tuple = (None,) * rows
        self._plans: dict[int, tuple] = {}  # id(layer) -> (layer, A, B)

    def plan(self, layer, dtype):
        got = self._plans.get(id(layer))
        if got is None:
            r = max((layer.weights(n)[0].shape[0] for n in layer.scaling), default=1)
            rows = len(self.names)
            A = torch.zeros(rows, layer.in_features, r, dtype=dtype, device=layer.device)
            B = torch.zeros(rows, r, layer.out_features, dtype=dtype, device=layer.device)
            got = self._plans[id(layer)] = (layer, A, B)
            self._fill_one(got, Route(self.names))
        return got[1], got[2]

    def own_rows(self, layer) -> list:
        return []

    def fill(self, names: Sequence[str | None]) -> None:
        self.names = tuple(names)
        gather = Route(self.names)
        for entry in self._plans.values():
            self._fill_one(entry, gather)

    @staticmethod
    def _fill_one(entry, gather: Route) -> None:
        layer, A, B = entry
        A.zero_()
        B.zero_()
        plan = gather.plan(layer, A.dtype)
        if plan is not None:
            A[:, :, :plan[0].shape[2]] = plan[0]
            B[:, :plan[1].shape[1]] = plan[1]


def graphable(model: GPT, names) -> bool:
    """Whether these adapters can run in a captured step: only low-rank updates fit its fixed A/B buffers
    (DoRA rows run per adapter group, eagerly)."""
    used = {n for n in names if n}
    return all(layer.variant[n].low_rank for layer in lora_layers(model).values() for n in used if layer.has(n))


class _Bucket:
    """A bucket's fixed inputs: tokens, positions and adapter weights, and its captured steps per length."""

    def __init__(self, model: GPT, rows: int):
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=model.device)
        self.route = GraphRoute(rows)
        self.replays: dict[int, Callable[[], torch.Tensor]] = {}


class ModelRunner:
    """Runs prefills and decode steps of `model` over the slot pool `kv`.

    graphs: replay captured steps (default: on CUDA); capture: how a step is captured (default
    `cuda_graph`; tests pass a stand-in to run the captured path's fixed buffers on the CPU); pad: pad
    eager steps up to their bucket too (default: only captured steps are padded)."""

    def __init__(self, model: GPT, kv: KVSlots, graphs: bool | None = None,
                 capture: Callable | None = None, pad: bool = False):
        self.model, self.kv = model, kv
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.capture = capture or cuda_graph
        self.pad = pad
        self.buckets = buckets_for(kv.rows)
        self.capture_error: str | None = None  # why captured steps were turned off, once they are
        self._buckets: dict[int, _Bucket] = {}
        self._version = None  # the model's adapter version the captured steps were made for
        self._pool = None
        self._route_key, self._route = None, None

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def prefill(self, prompt: Sequence[int], names: Sequence[str | None], slots: list[int]) -> torch.Tensor:
        """The prompt once per row of `names` into `slots`; the logits (rows, V) of its last token. The
        adapters' weights are gathered again from here on (a training run's adapter changes between calls)."""
        model = self.model
        self._route_key = None
        for b in self._buckets.values():
            b.route.names = ()  # refilled at the next captured step
        idx = torch.tensor([list(prompt)] * len(names), dtype=torch.long, device=model.device)
        return model(idx, make_route(model, list(names)), PrefillView(self.kv, slots), last_only=True)[:, -1]

    def decode(self, tokens: list[int], pos: list[int], names: list[str | None], slots: list[int] | None = None
               ) -> torch.Tensor:
        """One decode step of rows 0..n-1 of the pool (or of `slots`, eagerly): row b feeds tokens[b] at position
        pos[b] through its adapter names[b]. Returns the logits (n, V). Call `prepare` first (outside GUARD)."""
        n = len(tokens)
        if slots is not None:
            return self._eager(tokens, pos, names, slots)
        step = self._captured(n, max(pos) + 1) if self._use_graph(names) else None
        if step is not None:
            b = self._buckets[self.bucket(n)]
            self._load(b, tokens, pos, names)
            return step()[:n]
        if self.pad:
            extra = self.bucket(n) - n
            tokens, pos, names = tokens + [0] * extra, pos + [0] * extra, names + [None] * extra
        return self._eager(tokens, pos, names)[:n]

    def prepare(self, tokens: list[int], pos: list[int], names: list[str | None]) -> None:
        """Capture the step `decode(tokens, pos, names)` will replay, if it is not captured yet (takes the
        GPU alone meanwhile). A capture that raises turns captured steps off: said once, eager from then on."""
        if not self._use_graph(names) or self._captured(len(tokens), max(pos) + 1) is not None:
            return
        rows, length = self.bucket(len(tokens)), self._length(max(pos) + 1)
        b = self._buckets.setdefault(rows, _Bucket(self.model, rows))
        try:
            with GUARD.exclusive() if self.model.device.type == "cuda" else contextlib.nullcontext():
                self._load(b, tokens, pos, names)  # the warm-up writes what the real step writes
                if self._pool is None and self.model.device.type == "cuda":
                    self._pool = torch.cuda.graph_pool_handle()
                b.replays[length] = self.capture(lambda: self._step(b.tok, b.pos, b.route, length), self._pool)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager steps
            self.graphs, self.capture_error = False, f"{type(e).__name__}: {e}"
            self._buckets.clear()
            log.warning("decode steps run eagerly: capturing a CUDA graph failed (%s)", self.capture_error)

    def _use_graph(self, names) -> bool:
        if not self.graphs:
            return False
        version = getattr(self.model, "lora_version", 0)
        if version != self._version:  # adapters were added or removed: the captured steps saw the old layers
            self._buckets.clear()
            self._version = version
        return graphable(self.model, names)

    def _captured(self, n: int, longest: int):
        b = self._buckets.get(self.bucket(n))
        return None if b is None else b.replays.get(self._length(longest))

    def _length(self, longest: int) -> int:
        return min(self.kv.max_len, -(-longest // LENGTH_STEP) * LENGTH_STEP)

    def _load(self, b: _Bucket, tokens, pos, names) -> None:
        """Copy this step's inputs into the bucket's fixed buffers (dummy rows: token 0, position 0, base)."""
        extra = len(b.pos) - len(tokens)
        dev = self.model.device
        b.tok.copy_(torch.tensor(tokens + [0] * extra, device=dev).view(-1, 1))
        b.pos.copy_(torch.tensor(pos + [0] * extra, device=dev))
        padded = tuple(names) + (None,) * extra
        if b.route.names != padded:
            b.route.fill(padded)

    def _eager(self, tokens, pos, names, slots=None) -> torch.Tensor:
        key = (tuple(names), getattr(self.model, "lora_version", 0))
        if key != self._route_key:  # the batch changed: gather the rows' adapters again
            self._route, self._route_key = make_route(self.model, names), key
        dev = self.model.device
        p = torch.tensor(pos, device=dev)
        return self._step(torch.tensor(tokens, device=dev).view(-1, 1), p, self._route, max(pos) + 1, slots)

    def _step(self, tok: torch.Tensor, pos: torch.Tensor, route, length: int, slots=None) -> torch.Tensor:
        """The one decode forward (eager, or inside a capture): logits (rows, V)."""
        view = DecodeView(self.kv, pos, length, slots)
        mask = decode_mask(pos, length, self.model.dtype)
        return self.model(tok, route, view, pos=pos[:, None], mask=mask, last_only=True)[:, -1]

