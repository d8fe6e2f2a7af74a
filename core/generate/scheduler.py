"""The decode scheduler: who runs each iteration of the one decode loop (continuous batching).

Each request is one prompt continued by one or more rows (one row per adapter, None = the base):
a Compare with the base and 3 adapters is 4 rows of one request. Requests wait in a queue and join
at an iteration boundary, first come first served while the KV pool has free slots: their prompt is
prefilled into their slots (`ModelRunner.prefill`), then every iteration runs one decode step for all
running rows (`ModelRunner.decode`), each row routed to its own adapter, written at its own position
and attending under its own mask. Rows leave when done and their slots serve the next request.

The parts, as in vLLM's engine: this scheduler (queues, admission, per-user caps, the loop), the KV
slot manager (`kv_slots`), the model runner (`runner`: the forward, CUDA graphs per batch bucket) and
the sampler (`sampler`: per-request generators, temperature, top-k/top-p). It is the one decode path:
the studio's Compare, the CLI's compare and the trainer's samples (`sampling.generate`, which runs a
scheduler without a thread) all go through it.

A request's text depends only on its prompt, adapters and sampling settings, never on who else is in
the batch: its prefill runs alone, and it samples with its own seeded generator, one uniform draw per
step shared by its rows. (Batched matmuls and masked attention may round differently from a solo run in
the last bit; that can only flip a token at a floating-point near-tie.)
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from core.adapters.validate import AdapterError
from core.device import GUARD, threads_for_this_thread
from core.generate.kv_slots import KVSlots, crop_prompt, pool_rows
from core.generate.runner import ModelRunner
from core.generate.sampler import SamplingConfig, new_generator, sample
from core.generate.side_work import SHARE, SideWork, Unit
from core.lora.layers import adapter_names
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.model.gpt import GPT

T = TypeVar("T")


def default_lanes(model: GPT) -> int:
    """2 on a CPU with two or more cores: side work then runs beside the decode steps on the cores a decode
    step (one thread) leaves idle; 1 on a GPU, where the device runs one thing at a time anyway."""
    return 2 if model.device.type == "cpu" and (os.cpu_count() or 1) >= 2 else 1


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


class DecodeScheduler:
    """The decode loop serving every request submitted to it, on a thread of its own (or, with
    `thread=False`, on the caller's: `run_until_idle`, as `sampling.generate` does).

    max_rows: slots in the KV pool (rows decoded together at most; default: `pool_rows`, sized
    from free memory); max_len: tokens per slot (prompt + new tokens; longer prompts are cropped
    from the left, `crop_prompt`); max_queue: requests waiting at most (beyond it `submit` raises
    SchedulerBusy); max_rows_per_user: rows one user may have waiting or running. graphs, capture,
    pad: the model runner's (`ModelRunner`; default: CUDA graphs on CUDA, eager elsewhere). lanes: 1 or 2
    (default: 2 on a CPU with two or more cores, else 1), see core.generate.side_work.

    It is the base's one work loop: other work on the model (evaluation chunks, training micro-steps,
    adapters added or removed) comes in through `run` and takes its turns by core.generate.side_work's
    policy, on the loop's thread.
    """

    def __init__(self, model: GPT, max_rows: int | None = None, max_len: int | None = None, max_queue: int = 64,
                 max_rows_per_user: int = 8, thread: bool = True, graphs: bool | None = None,
                 capture=None, pad: bool = False, share: float = SHARE, lanes: int | None = None):
        block = model.config.block_size
        max_len = block if max_len is None else max_len
        if not 2 <= max_len <= block:
            raise ValueError(f"max_len must be from 2 to the context of {block} tokens (got {max_len}).")
        max_rows = pool_rows(model, max_len) if max_rows is None else max_rows
        if max_rows < 1 or max_queue < 0 or max_rows_per_user < 1:
            raise ValueError("max_rows and max_rows_per_user must be at least 1, max_queue at least 0.")
        self.model, self.max_rows, self.max_len = model, max_rows, max_len
        self.max_queue, self.max_rows_per_user = max_queue, max_rows_per_user
        self.kv = KVSlots(model, max_rows, max_len)
        self.runner = ModelRunner(model, self.kv, graphs=graphs, capture=capture, pad=pad)
        mutex = threading.RLock()
        self._cond = threading.Condition(mutex)
        self._work_ready = threading.Condition(mutex)  # notified as side work comes (the second lane sleeps on it)
        self._side = SideWork(share)  # evaluation chunks, training micro-steps, structure changes
        self._queue: deque[Request] = deque()
        self._joining: list[Request] = []  # admitted, slots counted, prefill not run yet
        self._rows: list[_Row] = []  # the running batch, ordered by slot
        self._reserved = 0  # slots counted for the joining requests
        self.step_count = 0
        self._closed = False
        self._pause = False  # two lanes: the side lane changes the model's structure; decoding parks meanwhile
        self._parked = False  # ... and has parked at an iteration boundary
        self._thread = self._side_thread = None
        if thread:
            self._thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
            self._thread.start()
            if (lanes or default_lanes(model)) == 2:
                self._side_thread = threading.Thread(target=self._side_lane, name="decode-scheduler-side", daemon=True)
                self._side_thread.start()

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
        req = Request(self, crop_prompt(prompt_ids, max_new, self.max_len), adapters, cfg, user, max_new)
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

    def run(self, fn: Callable[[], T], owner: object = None, urgent: bool = False) -> T:
        """Run fn() on the loop's thread as one unit of side work, when the policy gives it a turn
        (core.generate.side_work); returns its result or raises its error, here. owner: whose turn it takes
        (a user name; None: a turn of its own); urgent: before anything else at the next boundary (changes
        of the model's structure). On the loop's own thread, or a scheduler without a thread, fn runs now.
        Raises SchedulerClosed if the loop closes first."""
        if self._thread is None or threading.current_thread() in (self._thread, self._side_thread):
            return fn()
        unit = Unit(fn, owner if owner is not None else object(), urgent)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the base's work loop is closed")
            self._side.put(unit)
            self._cond.notify_all()
            self._work_ready.notify_all()
        return unit.wait()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests and side work still waiting or running end with SchedulerClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._work_ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._side_thread is not None:
                self._side_thread.join(timeout)
        else:
            self._end_all()

    # ---- the loop's side ---------------------------------------------------------------------

    def _finish(self, req: Request, error: BaseException | None = None) -> None:
        """End `req` (holding _cond) and free every slot it holds."""
        if req.done:
            return
        req.error = req.error or error
        req.done = True
        req._ended.set()
        if req in self._joining:
            self._joining.remove(req)
            self._reserved -= req.rows
        mine = [r for r in self._rows if r.request is req]
        self._rows = [r for r in self._rows if r.request is not req]
        self.kv.release(r.slot for r in mine)
        self._cond.notify_all()

    def _admit(self) -> list[Request]:
        """At an iteration boundary (holding _cond): end cancelled requests, count slots for the queue's head
        while they are free (first come, first served)."""
        for req in list(dict.fromkeys(r.request for r in self._rows)):
            if req.cancelled:
                self._finish(req)
        joining = []
        while self._queue and self._queue[0].rows <= self.kv.free - self._reserved:
            req = self._queue.popleft()
            self._reserved += req.rows
            joining.append(req)
        self._joining += joining
        return joining

    def _loop(self) -> None:
        # decode steps are a row per user wide: on a CPU one thread serves more answers (bench/load.py);
        # side work (training, evaluation) is wide and gets the process's threads back for its turn
        wide = torch.get_num_threads()
        narrow = self.model.device.type == "cpu" and threads_for_this_thread(1)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._queue or self._rows or self._pause or (
                    self._side_thread is None and self._side.waiting(urgent_only=False)))
                if self._closed:
                    break
            self._iteration()
            unit = self._next_unit() if self._side_thread is None else None
            if unit is not None:
                if narrow:
                    threads_for_this_thread(wide)
                seconds = unit.run()
                if narrow:
                    threads_for_this_thread(1)
                with self._cond:
                    self._side.ran(unit, seconds)
        self._end_all()

    def _side_lane(self) -> None:
        """The second lane (a CPU with cores to spare): side units one at a time, owners in turn, beside the
        decode steps. A structure change runs here too, between two units, while the decode lane is parked at
        an iteration boundary (`_changes`): decoding waits for the change alone, never for a unit."""
        while True:
            with self._cond:
                self._work_ready.wait_for(lambda: self._closed or self._side.waiting(urgent_only=False))
                if self._closed:
                    return
                unit = None if self._side.waiting(urgent_only=True) else self._side.take(decoding=False)
            if unit is None:
                self._changes()
            else:
                unit.run()

    def _changes(self) -> None:
        """(The side lane.) Park the decode lane at its next iteration boundary, run every structure change
        waiting, then let it go on."""
        with self._cond:
            self._pause = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._parked or self._closed)
        try:
            while True:
                with self._cond:
                    urgent = self._side.take_urgent()
                if urgent is None:
                    return
                urgent.run()
        finally:
            with self._cond:
                self._pause = False
                self._cond.notify_all()

    def _park(self) -> None:
        """(The decode lane, two lanes.) Wait here, at an iteration boundary, while the side lane changes the
        model's structure."""
        with self._cond:
            if not self._pause:
                return
            self._parked = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._pause or self._closed)
            self._parked = False

    def _next_unit(self) -> Unit | None:
        with self._cond:
            if self._closed:  # what still waits ends with the loop (_end_all)
                return None
            decoding = bool(self._queue or self._rows or self._joining)
            if not decoding:
                self._side.idle()
            return self._side.take(decoding)

    def run_until_idle(self) -> None:
        """(A scheduler made with thread=False.) Run iterations on this thread until no request is left."""
        while True:
            with self._cond:
                if self._closed or not (self._queue or self._rows or self._joining):
                    return
            self._iteration()

    def _iteration(self) -> None:
        """Structure changes, then admit and prefill what fits, then one decode step for every running row."""
        if self._side_thread is not None:
            self._park()
        while self._side_thread is None:
            with self._cond:
                urgent = self._side.take_urgent()
            if urgent is None:
                break
            urgent.run()
        with self._cond:
            joining = self._admit()
        with torch.inference_mode():
            for req in joining:
                self._join(req)
            try:
                self._step()
            except Exception as e:  # not one request's fault: every running request gets it
                with self._cond:
                    for req in list(dict.fromkeys(r.request for r in self._rows)):
                        self._finish(req, e)

    def _end_all(self) -> None:
        with self._cond:
            for req in self._live():
                self._finish(req, SchedulerClosed("the decode scheduler was closed"))
            self._queue.clear()
            for unit in self._side.drain():
                unit.end(SchedulerClosed("the base's work loop was closed"))

    def _join(self, req: Request) -> None:
        """Prefill `req`'s prompt into free slots, one row per adapter, as a solo run does."""
        try:
            with self._decoding():
                with self._cond:
                    self._reserved -= req.rows
                    self._joining.remove(req)
                    if req.cancelled:
                        self._finish(req)
                        return
                    slots = self.kv.allocate(req.rows)
                try:
                    logits = self.runner.prefill(req.prompt, req.adapters, slots)
                except BaseException:
                    with self._cond:
                        self.kv.release(slots)
                    raise
                with self._cond:
                    req._gen = new_generator(req.cfg, self.model.device)
                    T = len(req.prompt)
                    self._rows += [_Row(req, i, slot, T, logits, i) for i, slot in enumerate(slots)]
                    self._rows.sort(key=lambda r: r.slot)
        except Exception as e:  # an unknown adapter, a failing prefill: this request alone
            self._fail(req, e)

    @contextlib.contextmanager
    def _decoding(self, before=None):
        """One step or prefill, its time counted toward decoding's share of the loop.
        `before` runs outside GUARD (a graph capture takes GUARD alone)."""
        if before is not None:
            before()
        with GUARD.shared(self.model.device.type == "cuda"):
            start = time.perf_counter()
            try:
                yield
            finally:
                seconds = time.perf_counter() - start
                with self._cond:
                    self._side.decoded(seconds)

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
                for req in {r.request for r in self._rows if r.request.cancelled}:
                    self._finish(req)
                rows = self._compact()
        if rows:
            inputs = ([r.token for r in rows], [r.length for r in rows], [r.request.adapters[r.index] for r in rows])
            with self._decoding(before=lambda: self.runner.prepare(*inputs)):
                self._forward_each_alone_if_it_fails(rows)

    def _compact(self) -> list[_Row]:
        """(Holding _cond.) Move the running rows into the lowest slots; the batch, ordered by slot."""
        moves = self.kv.compact({r.slot: r.length for r in self._rows})
        for r in self._rows:
            r.slot = moves.get(r.slot, r.slot)
        self._rows.sort(key=lambda r: r.slot)
        return list(self._rows)

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
        """End `req` alone with `e`, or with one sentence when its adapter is no longer loaded (on the loop's
        thread, where adapters come and go, so the model's adapters are as the failing step saw them)."""
        gone = [a for a in req.adapters if a is not None and a not in adapter_names(self.model)]
        if gone:
            e = AdapterError(f"the adapter {gone[0]!r} is no longer loaded (it was removed while this request "
                             f"waited or generated); generate again.")
        with self._cond:
            self._finish(req, e)

    def _pick(self, rows: list[_Row]) -> dict[int, list[int]]:
        """id(request) -> its live rows' tokens (`sampler.sample`: one draw per request from its generator)."""
        sources = list({id(r.logits): r.logits for r in rows}.values())
        logits = sources[0] if len(sources) == 1 else torch.cat(sources)  # a request that just joined
        offset, at = {}, 0
        for t in sources:
            offset[id(t)], at = at, at + len(t)
        by_req: dict[int, list[_Row]] = {}
        for r in rows:
            by_req.setdefault(id(r.request), []).append(r)
        batch = [(rs[0].request.cfg, rs[0].request._gen, [offset[id(r.logits)] + r.at for r in rs])
                 for rs in by_req.values()]
        picked = sample(logits, batch)
        for rs, tokens in zip(by_req.values(), picked):
            for r, t in zip(rs, tokens):
                r.token = t
        return dict(zip(by_req, picked))

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
                    self.kv.release([r.slot])
            if all(req.row_done) or req.steps >= req.max_new:
                self._finish(req)
        self._cond.notify_all()

    def _forward(self, rows: list[_Row]) -> None:
        """One decode step for `rows`: each writes its last token at its own position."""
        slots = [r.slot for r in rows]
        logits = self.runner.decode([r.token for r in rows], [r.length for r in rows],
                                    [r.request.adapters[r.index] for r in rows],
                                    None if slots == list(range(len(rows))) else slots)
        for i, r in enumerate(rows):
            r.logits, r.at = logits, i
            r.length += 1
