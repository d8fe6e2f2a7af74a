"""The decode scheduler: one decode loop for many requests at once (continuous batching).

Each request is one prompt continued by one or more rows (one row per adapter, None = the base):
a Compare with the base and 3 adapters is 4 rows of one request. Requests wait in a queue, join
the running batch at a step boundary (their prompt is prefilled then, and its keys/values are
copied into free slots of a slotted KV pool) and leave when done: their slots are free for the
next step. Every step runs all rows of all requests in one forward, each row routed to its own
adapter, written at its own position and attending under its own mask.

A request's text depends only on its prompt, adapters and sampling settings, never on who else
is in the batch: the prefill is the one `sampling.stream` runs for the request alone, and each
request samples with its own seeded generator, one uniform draw per step shared by its rows,
exactly as `sampling.stream` does. (Batched matmuls and masked attention may round differently
from a solo run in the last bit; that can only flip a token at a floating-point near-tie.)
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch

from core.adapters.validate import AdapterError
from core.device import GUARD, available_memory, one_thread_for_this_thread
from core.generate.sampling import SamplingConfig, pick_tokens
from core.lora.layers import adapter_names, make_route
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.model.gpt import GPT, KVCache


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


class SchedulerBusy(RuntimeError):
    """The queue is full: the caller should show the message and let the user retry."""


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before the request finished."""


class Request:
    """One prompt continued by one row per adapter. Iterate it for the token ids so far per row
    (after each step; a slow reader skips to the latest state), or call `result()`."""

    def __init__(self, scheduler: "DecodeScheduler", prompt: list[int], adapters: list[str | None],
                 cfg: SamplingConfig, user, max_new: int):
        self._sched = scheduler
        self.prompt, self.adapters, self.cfg, self.user = prompt, adapters, cfg, user
        self.max_new = max_new  # new tokens per row at most (the pool's max_len caps it)
        self.tokens: list[list[int]] = [[] for _ in adapters]  # per row, without <|endoftext|>
        self.row_done = [False] * len(adapters)
        self.steps = 0  # sampling steps taken
        self.first_step: int | None = None  # the scheduler's step counter at this request's first
        self.last_step: int | None = None  # and last token (tests use them to prove overlap)
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = False
        self._ended = threading.Event()  # set with `done`: waiting on it is not woken by every step
        self._version = 0
        self._gen: torch.Generator | None = None

    @property
    def rows(self) -> int:
        return len(self.adapters)

    def position(self) -> int:
        """1 for the first request waiting in the queue, 2 for the next...; 0 once it runs or ended."""
        return self._sched._position(self)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the request is over (True) or `timeout` seconds passed (False). Unlike iterating, it
        is not woken at every decode step: a reader that shows the text every so often waits here between
        looks, so the end (the final text) is never late."""
        return self._ended.wait(timeout)

    def wait_queued(self, timeout: float | None = None) -> int:
        """Wait while the request is in the queue, `timeout` seconds at most; returns `position()` then
        (0: it left the queue: admitted, or over). Admission is seen at the next decode step at the latest."""
        with self._sched._cond:
            self._sched._cond.wait_for(lambda: self.done or self.position() == 0, timeout)
            return self.position()

    def cancel(self) -> None:
        """Stop this request; its rows are freed at the next step boundary (at once if it waits)."""
        self._sched._cancel(self)

    def __iter__(self) -> Iterator[list[list[int]]]:
        seen = 0
        cond = self._sched._cond
        while True:
            with cond:
                cond.wait_for(lambda: self._version != seen or self.done)
                seen, done = self._version, self.done
                snapshot = [list(r) for r in self.tokens]
            if seen:
                yield snapshot
            if done:
                if self.error is not None:
                    raise self.error
                return

    def result(self, timeout: float | None = None) -> list[list[int]]:
        """The new token ids per row once the request is over (raises its error, if it failed)."""
        with self._sched._cond:
            if not self._sched._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the request is still running")
        if self.error is not None:
            raise self.error
        return [list(r) for r in self.tokens]

    def texts(self) -> list[str]:
        """The text so far per row."""
        with self._sched._cond:
            rows = [list(r) for r in self.tokens]
        return [tokenizer.decode(r) for r in rows]


@dataclass(eq=False)  # rows are compared by identity (list.remove), never by their tensors
class _Row:
    request: Request
    index: int  # which row of its request
    slot: int  # its slot in the KV pool
    length: int  # tokens in its slot so far (the next one is written at this index)
    logits: torch.Tensor | None = None  # (n, V): the forward's logits, this row's next pick at `at`
    at: int = 0
    token: int = 0  # the last picked token, fed at the next step


class _SlotView:
    """The pool as a decode step sees it: row b writes at (slots[b], pos[b]) and attends over its
    slot up to `length` (the longest row; a mask hides the rest of each shorter row)."""

    def __init__(self, pool: KVCache, slots: list[int], pos: torch.Tensor, length: int):
        self.pool, self.pos, self.length = pool, pos, length
        self.slots = torch.tensor(slots, device=pos.device)
        first = slots[0]
        self.span = slice(first, first + len(slots)) if slots == list(range(first, first + len(slots))) else None

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        pk, pv = self.pool.k[layer], self.pool.v[layer]  # (max_rows, n_head, max_len, head_dim)
        pk[self.slots, :, self.pos] = k[:, :, 0]
        pv[self.slots, :, self.pos] = v[:, :, 0]
        if self.span is not None:  # contiguous slots: a view, no copy
            return pk[self.span, :, :self.length], pv[self.span, :, :self.length]
        return pk[self.slots, :, :self.length], pv[self.slots, :, :self.length]


def _gather_logits(rows: list[_Row]) -> torch.Tensor:
    """The rows' next-token logits as one (n, V) tensor: a view when they sit together in one forward's
    output (the common case after the first step), else a copy."""
    logits, first = rows[0].logits, rows[0].at
    if all(r.logits is logits and r.at == first + j for j, r in enumerate(rows)):
        return logits[first:first + len(rows)]
    if all(r.logits is logits for r in rows):
        return logits[torch.tensor([r.at for r in rows], device=logits.device)]
    return torch.stack([r.logits[r.at] for r in rows])


class DecodeScheduler:
    """One decode loop thread serving every request submitted to it.

    max_rows: slots in the KV pool (rows decoded together at most; default: `pool_rows`, sized
    from free memory); max_len: tokens per slot
    (prompt + new tokens; longer prompts are cropped from the left, as `sampling.stream` does);
    max_queue: requests waiting at most (beyond it `submit` raises SchedulerBusy);
    max_rows_per_user: rows one user may have waiting or running; lock: held around each step
    (prefill or decode), so a caller can share the model with other work.
    """

    def __init__(self, model: GPT, max_rows: int | None = None, max_len: int | None = None, max_queue: int = 64,
                 max_rows_per_user: int = 8, lock=None):
        block = model.config.block_size
        max_len = block if max_len is None else max_len
        if not 2 <= max_len <= block:
            raise ValueError(f"max_len must be from 2 to the context of {block} tokens (got {max_len}).")
        max_rows = pool_rows(model, max_len) if max_rows is None else max_rows
        if max_rows < 1 or max_queue < 0 or max_rows_per_user < 1:
            raise ValueError("max_rows and max_rows_per_user must be at least 1, max_queue at least 0.")
        self.model, self.max_rows, self.max_len = model, max_rows, max_len
        self.max_queue, self.max_rows_per_user = max_queue, max_rows_per_user
        self.pool = KVCache(model.config, max_rows, max_len, model.device, model.dtype)
        self._lock = lock if lock is not None else contextlib.nullcontext()
        mutex = threading.RLock()
        self._cond = threading.Condition(mutex)
        self._decoded = threading.Condition(mutex)  # notified as `decode_seconds` grows (not every reader)
        self._queue: deque[Request] = deque()
        self._joining: list[Request] = []  # admitted, slots reserved, prefill not run yet
        self._rows: list[_Row] = []  # the running batch
        self._free = list(range(max_rows))
        self._reserved: dict[int, list[int]] = {}  # id(request) -> its slots until it joins
        self._route_key = None
        self._route = None
        self.step_count = 0
        self.decode_seconds = 0.0  # time spent in steps and prefills, holding the lock (evaluation gives way by it)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
        self._thread.start()

    # ---- the caller's side ----------------------------------------------------------------

    def submit(self, prompt_ids: Sequence[int], adapters: Sequence[str | None] = (None,),
               cfg: SamplingConfig | None = None, user=None) -> Request:
        """Queue one prompt continued by each of `adapters` (None = base); returns its Request."""
        cfg = replace(cfg) if cfg is not None else SamplingConfig()
        cfg.validate()
        adapters = list(adapters)
        if not adapters:
            raise ValueError("a request needs at least one row (an adapter name, or None for the base).")
        if len(prompt_ids) == 0:
            raise ValueError("the prompt needs at least one token")
        most = min(self.max_rows, self.max_rows_per_user)
        if len(adapters) > most:
            raise ValueError(f"{len(adapters)} rows in one request is more than the {most} rows allowed at once; "
                             f"compare fewer adapters.")
        max_new = min(cfg.max_new_tokens, self.max_len - 1)
        prompt = list(prompt_ids)[-(self.max_len - max_new):]  # crop from the left so all fits
        req = Request(self, prompt, adapters, cfg, user, max_new)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the decode scheduler is closed")
            self._check_user(req)
            if len(self._queue) >= self.max_queue:
                n = len(self._queue)
                raise SchedulerBusy(f"busy, try again in a moment ({n} request{'s are' if n != 1 else ' is'} waiting).")
            self._queue.append(req)
            self._cond.notify_all()
        return req

    def _check_user(self, req: Request) -> None:
        if req.user is None:
            return
        mine = [r for r in self._live() if r.user == req.user]
        used = sum(r.rows for r in mine)
        if used + req.rows > self.max_rows_per_user:
            raise ValueError(f"you already have {used} rows generating or waiting; the limit is "
                             f"{self.max_rows_per_user} rows per user. Wait for them to finish or stop one.")

    def _live(self) -> list[Request]:
        running = list(dict.fromkeys(r.request for r in self._rows))
        return list(self._queue) + self._joining + running

    def _position(self, req: Request) -> int:
        with self._cond:
            for i, r in enumerate(self._queue):
                if r is req:
                    return i + 1
            return 0

    def _cancel(self, req: Request) -> None:
        with self._cond:
            if req.done:
                return
            req.cancelled = True
            if req in self._queue:  # never started: it leaves the queue now
                self._queue.remove(req)
                self._finish(req)
            self._cond.notify_all()

    def wait_decoded(self, seconds: float, timeout: float) -> None:
        """Wait until `decode_seconds` reaches `seconds`, at most `timeout` seconds; at once when there is no
        decode work (nothing waiting, joining or running) or the scheduler is closed."""
        with self._cond:
            self._decoded.wait_for(lambda: self.decode_seconds >= seconds or self._closed or not self._live(), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running end with SchedulerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the loop's side ---------------------------------------------------------------------

    def _finish(self, req: Request, error: BaseException | None = None) -> None:
        """End `req` (holding _cond) and free every slot it holds."""
        if req.done:
            return
        req.error = req.error or error
        req.done = True
        req._ended.set()
        self._free += self._reserved.pop(id(req), [])
        for row in [r for r in self._rows if r.request is req]:
            self._rows.remove(row)
            self._free.append(row.slot)
        self._free.sort()  # lowest slots first keeps the batch contiguous (a view, not a gather)
        self._cond.notify_all()

    def _admit(self) -> list[Request]:
        """At a step boundary (holding _cond): drop cancelled requests, reserve slots for the queue's
        head while it fits (first come, first served)."""
        for req in list(dict.fromkeys(r.request for r in self._rows)):
            if req.cancelled:
                self._finish(req)
        joining = []
        while self._queue and self._queue[0].rows <= len(self._free):
            req = self._queue.popleft()
            self._reserved[id(req)] = self._free[:req.rows]
            del self._free[:req.rows]
            joining.append(req)
        self._joining = list(joining)  # _join removes each from this list, not from the one returned
        return joining

    def _loop(self) -> None:
        if self.model.device.type == "cpu":
            # this thread's ops are a row per user wide; measured with bench/load.py (30 clients, a run
            # training): 11.5 -> 13.4 answers/s, the training run's steps unchanged
            one_thread_for_this_thread()
        with torch.inference_mode():
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._queue or self._rows)
                    if self._closed:
                        break
                    joining = self._admit()
                for req in joining:
                    self._join(req)
                try:
                    self._step()
                except Exception as e:  # not one request's fault: every running request gets it
                    with self._cond:
                        for req in list(dict.fromkeys(r.request for r in self._rows)):
                            self._finish(req, e)
        with self._cond:
            for req in self._live():
                self._finish(req, SchedulerClosed("the decode scheduler was closed"))
            self._queue.clear()
            self._joining = []

    def _join(self, req: Request) -> None:
        """Prefill `req`'s prompt as a solo run would and copy its keys/values into its slots."""
        model, dev = self.model, self.model.device
        try:
            with self._decoding():
                route = make_route(model, req.adapters)  # an unknown adapter fails this request only
                T = len(req.prompt)
                cache = KVCache(model.config, req.rows, T, dev, model.dtype)
                idx = torch.tensor([req.prompt] * req.rows, dtype=torch.long, device=dev)
                logits = model(idx, route, cache, 0, last_only=True)[:, -1]
                gen = torch.Generator(device=dev)
                gen.manual_seed(int(req.cfg.seed))
                with self._cond:
                    self._joining.remove(req)
                    if req.cancelled:
                        self._finish(req)  # frees its reserved slots
                        return
                    slots = self._reserved[id(req)]
                    s = torch.tensor(slots, device=dev)
                    self.pool.k[:, s, :, :T] = cache.k
                    self.pool.v[:, s, :, :T] = cache.v
                    req._gen = gen
                    del self._reserved[id(req)]  # the slots now belong to its rows
                    self._rows += [_Row(req, i, slot, T, logits, i) for i, slot in enumerate(slots)]
        except Exception as e:
            with self._cond:
                if req in self._joining:
                    self._joining.remove(req)
            with self._lock:  # the model's adapters do not change while `_fail` looks at them
                self._fail(req, e)

    @contextlib.contextmanager
    def _decoding(self):
        """Hold the lock for one step or prefill, adding the time it took to `decode_seconds`."""
        with self._lock, GUARD.shared(self.model.device.type == "cuda"):
            start = time.perf_counter()
            try:
                yield
            finally:
                with self._cond:
                    self.decode_seconds += time.perf_counter() - start
                    self._decoded.notify_all()

    def _step(self) -> None:
        """Pick each row's next token, publish, drop finished rows, then one forward for the rest."""
        with self._decoding():
            with self._cond:  # a request cancelled meanwhile gets no more tokens (freed at the boundary)
                rows = [r for r in self._rows if not r.request.cancelled]
            if not rows:
                return
            picked = self._pick(rows)
            with self._cond:
                self.step_count += 1
                self._publish(picked)
                rows = [r for r in self._rows if not r.request.cancelled and not r.request.row_done[r.index]]
            if rows:
                self._forward_each_alone_if_it_fails(rows)

    def _forward_each_alone_if_it_fails(self, rows: list[_Row]) -> None:
        """One forward for `rows`; if it raises, each request's rows again on their own, so a failure (its
        adapter gone, its rows raising) ends that request alone. A retry is the same step: a row's position
        and token only move on after its forward succeeded, and a failed one wrote only at that position."""
        try:
            self._forward(rows)
            return
        except Exception as e:
            requests = list(dict.fromkeys(r.request for r in rows))
            if len(requests) == 1:
                self._fail(requests[0], e)
                return
        for req in requests:
            try:
                self._forward([r for r in rows if r.request is req])
            except Exception as e:
                self._fail(req, e)

    def _fail(self, req: Request, e: Exception) -> None:
        """(Holding lock.) End `req` alone with `e`, or with one sentence when its adapter is no longer loaded."""
        gone = [a for a in req.adapters if a is not None and a not in adapter_names(self.model)]
        if gone:
            e = AdapterError(f"the adapter {gone[0]!r} is no longer loaded (it was removed while this request "
                             f"waited or generated); generate again.")
        with self._cond:
            self._finish(req, e)

    def _pick(self, rows: list[_Row]) -> dict[int, list[int]]:
        """id(request) -> its live rows' tokens; one uniform draw per request, as sampling.stream.

        Requests with the same sampling settings are picked in one call: every operation of
        `pick_tokens` works row by row, so a row's token is the one a call for its request alone
        gives, while the per-call overhead is paid once per setting, not once per request."""
        by_req: dict[int, list[_Row]] = {}
        for r in rows:
            by_req.setdefault(id(r.request), []).append(r)
        groups: dict[tuple, list[list[_Row]]] = {}
        for rs in by_req.values():
            c = rs[0].request.cfg
            groups.setdefault((c.temperature, c.top_k, c.top_p), []).append(rs)
        out = {}
        for (temperature, *_), reqs in groups.items():
            flat = [r for rs in reqs for r in rs]
            u = None
            if temperature > 0:  # each request's own generator, one draw per step shared by its rows
                draws = [torch.rand((1, 1), generator=rs[0].request._gen, device=self.model.device)
                         for rs in reqs]
                u = torch.cat([d.expand(len(rs), 1) for d, rs in zip(draws, reqs)])
            picked = pick_tokens(_gather_logits(flat), reqs[0][0].request.cfg, u).tolist()
            for r, t in zip(flat, picked):
                r.token = t
            at = 0
            for rs in reqs:
                out[id(rs[0].request)] = picked[at:at + len(rs)]
                at += len(rs)
        return out

    def _publish(self, picked: dict[int, list[int]]) -> None:
        """Append the picked tokens (holding _cond); end rows at <|endoftext|>, requests when done."""
        for req in list(dict.fromkeys(r.request for r in self._rows)):
            if id(req) not in picked:
                continue
            live = [r for r in self._rows if r.request is req and not req.row_done[r.index]]
            for r, t in zip(live, picked[id(req)]):
                if req.cfg.stop_at_eot and t == EOT_TOKEN:
                    req.row_done[r.index] = True
                elif t != EOT_TOKEN:
                    req.tokens[r.index].append(t)
            req.steps += 1
            req.first_step = req.first_step or self.step_count
            req.last_step = self.step_count
            req._version += 1
            for r in live:  # a row that ended frees its slot now
                if req.row_done[r.index]:
                    self._rows.remove(r)
                    self._free.append(r.slot)
            if all(req.row_done) or req.steps >= req.max_new:
                self._finish(req)
        self._free.sort()
        self._cond.notify_all()

    def _forward(self, rows: list[_Row]) -> None:
        """One decode step for `rows`: each writes its last token at its own position."""
        model, dev = self.model, self.model.device
        names = [r.request.adapters[r.index] for r in rows]
        key = (tuple(names), getattr(model, "lora_version", 0))
        if key != self._route_key:  # the batch changed: gather the rows' adapters again
            self._route, self._route_key = make_route(model, names), key
        pos = torch.tensor([r.length for r in rows], device=dev)
        length = int(pos.max()) + 1
        view = _SlotView(self.pool, [r.slot for r in rows], pos, length)
        mask = (torch.arange(length, device=dev)[None, :] <= pos[:, None])[:, None, None, :]
        tokens = torch.tensor([[r.token] for r in rows], device=dev)
        logits = model(tokens, self._route, view, 0, pos=pos[:, None], mask=mask)[:, -1]
        for i, r in enumerate(rows):
            r.logits, r.at = logits, i
            r.length += 1
