"""One shared base model per process, with library adapters hot-swapped on it.

Every user of the studio goes through one Engine. The base is loaded once; adapters are loaded
beside each other on it and chosen per batch row (core.lora.layers routing), so nobody flips global
state under anybody else and the base weights are never written. An adapter whose files change
on disk is loaded again under a new internal name; generations already running keep the old
version until they finish, then it is removed.

One work loop per base: the loaded base's DecodeScheduler (core.generate) is the one thread that runs
it. Every Compare streams through it (continuous batching over a slotted KV pool, CUDA graphs per batch
bucket on GPUs, each request with its own seeded generator), on every device, and everything else that
touches the model goes in through `on_loop`, taking its turn by core.generate.side_work's policy:
evaluation and token-difference chunks, the training jobs' micro-steps, and adapters added or removed.
So no step sees the model change under it, and the loop takes no lock.

Locking: `Engine.lock` guards the engine's own records (which base, which adapters are loaded, who
uses them). The work loop never takes it, so a caller holding it may wait for the loop. The trainer adds
its own adapter under a name that cannot be a library name (e.g. 'train:<run>'); requests can never name
it (`check_adapter`), and it leaves through `retire`, as every adapter does: an adapter a running request
uses is removed only when its last user ends.

Pinning: a training run loads its base with `base(..., pin=True)` and holds the pin until the
run ends (`unpin_base`). Meanwhile no other request can replace the base (BaseInUse): a Compare
on another base, queued while the run's base was loading, would otherwise swap the model under
the starting run, which would then train a base nobody tracks. A request (compare, evaluate, token
differences, export) holds the base the same way while it runs: one user switching the base would
otherwise end every other user's request.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import torch

from core.adapters.format import CONFIG, WEIGHTS
from core.adapters.validate import AdapterError
from core.adapters.library import Library
from core.adapters.export import export_merged
from core.adapters.resolve import AdapterRef, load_adapter, resolve
from core.checks import is_whole
from core.device import pick_device
from core.generate.sampling import SamplingConfig, TextSoFar
from core.generate.scheduler import DecodeScheduler, SchedulerClosed
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.lora.layers import adapter_names, remove_adapter
from core.lora.config import LoraConfig
from core.model.gpt import GPT
from core.model.weights import hf_state_dict, load_base
from core.train.evaluate import (EVAL_TOKENS, Evaluation, TokenDiff, check_models, check_settings, evaluate_models,
                                 token_differences)


@dataclass
class _Slot:
    loaded: str  # the adapter's name inside the model
    path: Path  # its folder or file
    in_library: bool  # False for a path given to load()
    lcfg: LoraConfig  # its settings as saved (rank, alpha, targets)
    signature: tuple  # (mtime_ns, size, inode) of its files when loaded
    used: float  # last use, for evicting the least recently used


T = TypeVar("T")
QUEUE_POLL_S = 0.1  # how often a request waiting in the scheduler's queue looks at its place, at least
DEFAULT_MAX_NEW_TOKENS = 512  # new tokens per compare request (the Compare tab's slider goes this far)


class Texts(list):
    """What a compare stream yields: the text so far per row (a list of str, equal to one). `waiting`: the
    request's place in the decode scheduler's queue (1 = next) while it waits for free rows, its texts
    empty meanwhile; 0 once it generates."""

    def __init__(self, texts=(), waiting: int = 0):
        super().__init__(texts)
        self.waiting = waiting


class BaseInUse(ValueError):
    """Another base was asked for while training runs (or starts) on the loaded one."""


class Engine:
    def __init__(self, device="auto", library_dir="adapters", dtype: torch.dtype | None = None,
                 max_loaded: int = 16, max_train_memory: int | None = None, max_rows_per_user: int = 8,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, gpu_calls=None, lanes: int | None = None):
        """max_rows_per_user: rows one user may have generating or waiting at once (a Compare with the base
        and 3 adapters is 4 rows). max_new_tokens: new tokens one compare request may ask for (more is refused).
        gpu_calls: on ZeroGPU (core.zerogpu_calls.GpuCalls), where compare, evaluate and token differences go
        once checked: this engine's base stays on the CPU. lanes: the work loop's (DecodeScheduler; default: its
        device's)."""
        self.gpu_calls = gpu_calls
        self.lanes = lanes
        self.device = pick_device(device) if isinstance(device, str) else torch.device(device)
        if max_rows_per_user < 1:
            raise ValueError(f"max rows per user must be at least 1 (got {max_rows_per_user}).")
        self.max_rows_per_user = max_rows_per_user
        if not is_whole(max_new_tokens, 1):
            raise ValueError(f"max new tokens must be a whole number of at least 1 (got {max_new_tokens!r}).")
        self.max_new_tokens = max_new_tokens
        self._scheduler: DecodeScheduler | None = None  # for the loaded base, made on first use
        self.dtype = dtype
        self.library_dir = Path(library_dir)
        self._library: Library | None = None
        self.lock = threading.RLock()
        self.max_loaded = max_loaded  # library adapters kept loaded at once (unused ones are evicted)
        self.base_id: str | None = None
        self._model: GPT | None = None
        self._base_key = None
        self._slots: dict[str, _Slot] = {}  # library name or resolved path -> loaded adapter
        self._refs: Counter = Counter()  # loaded name -> generations using it now
        self._retired: set[str] = set()  # replaced versions to remove once unused
        self._versions = itertools.count(2)
        self._base_pins = 0  # training runs (starting or running) that need the loaded base to stay
        self._base_users = 0  # requests running on the loaded base now (compare, evaluate, exports): it stays too
        self.max_train_memory = max_train_memory  # bytes: cap on a training run's estimated peak (None = RAM/GPU)

    @property
    def library(self) -> Library:
        """The adapter library, opened (and its folder created) on first use: a CLI run that only
        loads adapters by path leaves no library folder behind."""
        with self.lock:
            if self._library is None:
                self._library = Library(self.library_dir)
            return self._library

    # ---- the base ----------------------------------------------------------------------

    def base(self, model_name_or_path: str = "gpt2", weights=None,
             progress: Callable[[str], None] | None = None, *, pin: bool = False) -> GPT:
        """Load the base once and cache it; a different base replaces it (and its adapters), unless
        a training run holds it pinned (BaseInUse).

        weights: a local file/folder with the weights of `model_name_or_path` (instead of the hub).
        pin: for a training run: the base stays until `unpin_base(model)`; pinned under the same lock
            hold that loads it, so no request queued during the load can replace it first.
        """
        key = (str(model_name_or_path), str(weights) if weights else None)
        with self.lock:
            if self._model is None or self._base_key != key:
                if self._base_pins:
                    raise BaseInUse(f"the base model {self.base_id} is in use by a starting or running training "
                                    f"job, so it cannot change to {model_name_or_path} now; choose {self.base_id}, "
                                    f"or wait for the run to end.")
                if self._base_users:  # replacing it would end their requests (one user's switch, everyone's loss)
                    raise BaseInUse(f"the base model {self.base_id} is generating or evaluating for other requests, "
                                    f"so it cannot change to {model_name_or_path} now; choose {self.base_id}, or try "
                                    f"again in a moment.")
                model = load_base(weights or model_name_or_path, self.device, self.dtype, progress)
                self._close_scheduler()  # its requests on the old base end (SchedulerClosed)
                self._model, self._base_key, self.base_id = model, key, str(model_name_or_path)
                self._slots.clear()
                self._refs.clear()
                self._retired.clear()
            if pin:
                self._base_pins += 1
            return self._model

    def unpin_base(self, model: GPT) -> None:
        """Release one pin taken by base(..., pin=True) on `model` (nothing if the base is another)."""
        with self.lock:
            if model is self._model and self._base_pins > 0:
                self._base_pins -= 1

    @property
    def model(self) -> GPT | None:
        return self._model

    def shared_model(self) -> GPT:
        """The loaded base (for the trainer and tools); raises if none is loaded yet."""
        model = self._model
        if model is None:
            raise AdapterError("no base model is loaded yet; choose a model first.")
        return model

    # ---- adapters ------------------------------------------------------------------------

    def resolve(self, spec: str) -> AdapterRef:
        """Where a reference points (the CLI's --lora): a library name ('run' or 'run@step_000050'), or
        a path to an adapter folder or .safetensors file. Reads the library only if its folder exists."""
        return resolve(spec, self.library_dir)

    def load(self, ref: str | AdapterRef) -> str:
        """Load a reference (see `resolve`) unless the same files are loaded already; returns the name
        to route rows to: the library name, or for a path its full resolved path."""
        with self.lock:
            self.shared_model()
            if not isinstance(ref, AdapterRef):
                try:
                    ref = self.resolve(ref)
                except AdapterError:
                    slot = self._slots.get(ref)
                    if slot is not None and slot.in_library:
                        self._drop(ref)  # deleted or renamed in the library meanwhile
                    raise
            if ref.library_name is not None:
                return self._ensure(ref.library_name, ref.path, True)
            return self._ensure(str(ref.path.resolve()), ref.path, False)

    def config_of(self, name: str) -> LoraConfig:
        """The saved settings of a loaded adapter (library name, path key or loaded name)."""
        with self.lock:
            slot = next((s for k, s in self._slots.items() if name in (k, s.loaded)), None)
            if slot is None:
                raise AdapterError(f"no adapter named {name!r} is loaded.")
            return slot.lcfg

    def loaded(self) -> dict[str, str]:
        """Library name (or path) -> the name it is loaded under."""
        with self.lock:
            return {k: s.loaded for k, s in self._slots.items()}

    @contextmanager
    def _pinned(self, adapters):
        with self.lock:
            model = self.shared_model()
            names = []
            try:
                for a in adapters:
                    names.append(None if a is None else self._name_for(a))
                    if names[-1]:  # pinned at once: loading the next one may evict idle adapters
                        self._refs[names[-1]] += 1
            except BaseException:
                self._unpin(names, model)
                raise
            self._base_users += 1
        try:
            yield model, names
        finally:
            with self.lock:
                self._base_users -= 1
                self._unpin(names, model)

    # ---- generation ------------------------------------------------------------------------

    def compare(self, prompt: str, adapters: Sequence[str | None],
                cfg: SamplingConfig | None = None, user=None,
                every: float | Callable[[], float] | None = None) -> Iterator["Texts"]:
        """Stream one continuation of `prompt` per entry of `adapters` (None = the base) in one
        batch; yields the texts so far (a `Texts`, a list of str) after every token, or at most once per
        `every` seconds (a number, or a function asked before each wait, so a busy server can slow every
        stream down): a slow reader skips to the latest texts, and the final texts come at once.
        Unknown adapters and more new tokens than `max_new_tokens` raise here, eagerly.

        user: who asks (a user name or a session id), for the scheduler's rows-per-user cap. A full queue
        raises SchedulerBusy, and the cap a ValueError, when iteration starts; while the
        request waits for free rows it yields empty texts with `waiting` = its place in the queue.
        Closing the generator (the caller stopped reading) cancels the request and frees its rows."""
        if not adapters:
            raise AdapterError("choose at least one model to compare (the base or an adapter).")
        cfg = cfg or SamplingConfig()
        cfg.validate()
        if cfg.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"{cfg.max_new_tokens} new tokens is more than this server allows per request "
                             f"({self.max_new_tokens}, its --max-new-tokens); ask for fewer.")
        with self.lock:
            self.shared_model()
            for a in adapters:
                if a is not None:
                    self._name_for(a)
        pace = every if callable(every) else (lambda: every or 0.0)
        if self.gpu_calls is not None:
            return self.gpu_calls.compare(self, prompt, list(adapters), cfg, pace)
        return self._stream(prompt, list(adapters), cfg, user, pace)

    def scheduler(self) -> DecodeScheduler:
        """The decode scheduler of the loaded base (made on first use; a new base gets a new one)."""
        with self.lock:
            model = self.shared_model()
            if self._scheduler is None or self._scheduler.model is not model:
                self._close_scheduler()
                self._scheduler = DecodeScheduler(model, max_rows_per_user=self.max_rows_per_user, lanes=self.lanes)
                # an engine dropped (or the process ending) stops its loop thread; at exit it is given time
                # to finish its step, since a thread killed inside a torch call aborts the process
                weakref.finalize(self, self._scheduler.close, 5)
            return self._scheduler

    def on_loop(self, model: GPT, fn: Callable[[], T], owner: object = None, urgent: bool = False) -> T:
        """Run fn() on `model`'s work loop when its turn comes (DecodeScheduler.run: owner, urgent), and return
        its result: the one way work reaches the shared base's weights. A model that is not the loaded base
        (one nobody else shares any more) runs fn here."""
        with self.lock:
            sched = self.scheduler() if model is self._model else None
        return fn() if sched is None else sched.run(fn, owner, urgent)

    def change(self, model: GPT, fn: Callable[[], T]) -> T:
        """Change `model`'s structure (add or remove an adapter) with fn(): on its work loop at the next step
        boundary, holding `lock` meanwhile, so nobody reads the adapters while they change."""
        with self.lock:  # without a loop yet, nothing else runs on the model: it changes here (ZeroGPU: always)
            if self._scheduler is None or self._scheduler.model is not model:
                return fn()
            return self._scheduler.run(fn, urgent=True)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the decode scheduler's loop and wait for its thread to end (running requests end with
        SchedulerClosed). A process should call it before it exits: interpreter shutdown in the middle of
        the loop's torch call aborts the process ("terminate called without an active exception").
        The engine stays usable: the next compare makes a new scheduler."""
        with self.lock:
            sched, self._scheduler = self._scheduler, None
        if sched is not None:  # joined outside the lock: the loop takes it around each step
            sched.close(timeout)

    def _close_scheduler(self) -> None:
        """(Holding lock.) Stop the loop without waiting for it: it may be waiting for this lock."""
        if self._scheduler is not None:
            self._scheduler.close(timeout=0)
            self._scheduler = None

    def _stream(self, prompt, adapters, cfg, user, pace):
        with self._pinned(adapters) as (model, names):  # the adapters stay loaded while the request lives
            with self.lock:
                sched = self.scheduler()
                if sched.model is not model:  # the base changed between pinning and here
                    raise AdapterError("the base model changed while this request started; generate again.")
            req = sched.submit(tokenizer.encode(prompt) or [EOT_TOKEN], names, cfg, user)
            try:
                # no free rows: say where it stands in the queue, and again when that changes (looked at every
                # so often); one admitted within QUEUE_POLL_S (usually: at the next step boundary) never says it
                shown, place = 0, req.wait_queued(QUEUE_POLL_S)
                while place > 0:
                    if place != shown:
                        shown = place
                        yield Texts([""] * len(names), waiting=place)
                    place = req.wait_queued(max(pace(), QUEUE_POLL_S))
                rows = [TextSoFar() for _ in names]
                seen = [0] * len(names)  # tokens each row's text holds
                for tokens in req:  # the latest tokens after each step, or after the wait below
                    for i, (row, new) in enumerate(zip(rows, tokens)):
                        for t in new[seen[i]:]:
                            row.add(t)
                        seen[i] = len(new)
                    shown_at = time.monotonic()
                    yield Texts(row.text for row in rows)
                    wait = shown_at + pace() - time.monotonic()
                    if wait > 0:
                        req.wait(wait)  # woken at once when the request ends: the final texts are never late
            except SchedulerClosed:
                raise AdapterError("the base model was changed by another request while this one generated; "
                                   "generate again.") from None
            finally:
                req.cancel()  # the caller stopped reading (Stop, a closed page): its rows free at the next step

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, ids, adapters: Sequence[str | None], seq_len: int = 128, max_tokens: int | None = None,
                 stop: threading.Event | None = None, mask=None, user=None) -> Evaluation:
        """Mean loss of each entry of `adapters` (None = the base) on token ids `ids`, all in one batched pass
        on the shared base (core.train.evaluate.evaluate_models). The adapters stay pinned while it runs; each
        chunk of it is a unit of the work loop's side work, taking `user`'s turns, so Compares keep streaming
        beside it. `mask`: the split's loss mask (instruction data): only response tokens are scored."""
        max_tokens = EVAL_TOKENS if max_tokens is None else max_tokens
        check_models(adapters)  # before any adapter is loaded
        check_settings(seq_len, max_tokens, self.shared_model().config.block_size)
        if self.gpu_calls is not None:
            return self.gpu_calls.evaluate(self, ids, adapters, seq_len, max_tokens, mask)
        owner = user if user is not None else object()  # an anonymous evaluation takes turns of its own
        with self._pinned(adapters) as (model, names):
            ev = evaluate_models(model, names, ids, seq_len, max_tokens, stop=stop, mask=mask,
                                 run=lambda fn: self.on_loop(model, fn, owner))
        for score, asked in zip(ev.scores, adapters):
            score.name = asked  # the caller's name, not the internal (perhaps versioned) one
        return ev

    def token_differences(self, text: str, adapter: str, user=None) -> list[TokenDiff]:
        """Each token of `text` scored by the base and by `adapter` (core.train.evaluate.token_differences), in
        chunks on the work loop, as `evaluate`."""
        if not isinstance(adapter, str) or not adapter:
            raise AdapterError("choose an adapter to compare with the base.")
        if self.gpu_calls is not None:
            return self.gpu_calls.token_differences(self, text, adapter)
        owner = user if user is not None else object()
        with self._pinned([adapter]) as (model, names):
            return token_differences(model, text, names[0], run=lambda fn: self.on_loop(model, fn, owner))

    def export_merged(self, adapter: str, out_dir) -> Path:
        """An HF-format folder of the base with an adapter merged in (a library name, or a name `load`
        returned); the shared model is untouched."""
        with self._pinned([adapter]) as (model, names):
            return export_merged(model, names[0], out_dir, base_state=self._fp32_base(model))

    def export_gguf(self, adapter: str, out_path, qtype: str = "f16") -> Path:
        """A GGUF file (llama.cpp's GPT-2 layout) of the base with an adapter merged in; see export_merged."""
        from core.adapters.gguf_export import export_gguf  # the optional gguf package is needed only here
        with self._pinned([adapter]) as (model, names):
            return export_gguf(model, names[0], out_path, qtype, title=adapter, base_state=self._fp32_base(model))

    def export_gguf_adapter(self, adapter: str, out_path) -> Path:
        """The adapter alone as a GGUF adapter file for llama.cpp's --lora (over a GGUF of the same base)."""
        from core.adapters.gguf_export import export_gguf_adapter
        with self._pinned([adapter]) as (model, names):
            return export_gguf_adapter(model, names[0], out_path, title=adapter)

    def _fp32_base(self, model: GPT) -> dict[str, torch.Tensor] | None:
        """The loaded base's weights in fp32, read again from their source when the shared base is held in
        bf16 (CUDA, --precision bf16), so an export carries the base as published; None when it is fp32."""
        if model.dtype == torch.float32:
            return None
        name, weights = self._base_key
        return hf_state_dict(load_base(weights or name, "cpu", torch.float32))

    # ---- internals ---------------------------------------------------------------------------

    def check_adapter(self, name) -> str:
        """The one rule for an adapter a request names (compare, evaluate, token differences, exports): a library
        adapter ('run' or 'run@step_000050'), or a path `load` loaded in this process (the CLI's). Never a name
        that is only loaded: a training run's live 'train:<run>' (another user's unfinished work, removed when
        its run ends) or a replaced version 'x~2'. Raises AdapterError; loads nothing."""
        with self.lock:
            self._source(name)
        return name

    def _source(self, a) -> tuple[str, Path, bool]:
        """(Holding lock.) `check_adapter`'s rule: the slot key, files and in_library of adapter name `a`."""
        if not isinstance(a, str):
            raise AdapterError(f"adapter names are strings (got {type(a).__name__}).")
        slot = self._slots.get(a)
        if slot is not None and not slot.in_library:  # loaded by path: re-checked for changes too
            return a, slot.path, False
        try:
            return a, self.library.path(a), True
        except AdapterError:
            if slot is not None:
                self._drop(a)  # deleted or renamed in the library meanwhile
            raise

    def _name_for(self, a: str) -> str:
        """Adapter name (see `check_adapter`) -> the name it is loaded under, loading it if needed."""
        return self._ensure(*self._source(a))

    def _ensure(self, key: str, path: Path, in_library: bool) -> str:
        model = self.shared_model()
        sig = _signature(path)
        slot = self._slots.get(key)
        if slot is not None and slot.signature == sig:
            slot.used = time.monotonic()
            return slot.loaded
        # a changed file is loaded beside the old version, which finishes its running generations
        name = key if key not in adapter_names(model) else f"{key}~{next(self._versions)}"
        name, lcfg, _ = load_adapter(model, path, name, base_id=self.base_id, run=lambda fn: self.change(model, fn))
        if slot is not None:
            self._retire(slot.loaded)
        self._slots[key] = _Slot(name, path, in_library, lcfg, sig, time.monotonic())
        self._evict(keep=key)
        return name

    def _drop(self, key: str) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._retire(slot.loaded)

    def retire(self, model: GPT, loaded: str) -> None:
        """Remove adapter `loaded` from `model` once no request uses it (a training run's live adapter when the
        run ends): the one way adapters leave the shared base, so a running request never loses its rows'."""
        with self.lock:
            if model is self._model:
                self._retire(loaded)
            elif loaded in adapter_names(model):  # a base no longer shared: nobody else routes to it
                remove_adapter(model, loaded)

    def _retire(self, loaded: str) -> None:
        model = self._model
        if self._refs[loaded] > 0:
            self._retired.add(loaded)
        elif model is not None and loaded in adapter_names(model):
            self.change(model, lambda: remove_adapter(model, loaded))

    def _unpin(self, names, model) -> None:
        if model is not self._model:  # the base was replaced meanwhile; its adapters went with it
            return
        for n in names:
            if n:
                self._refs[n] -= 1
                if self._refs[n] <= 0:
                    del self._refs[n]
                    if n in self._retired:
                        self._retired.discard(n)
                        self._retire(n)

    def _evict(self, keep: str) -> None:
        # `keep`: the one just loaded, not pinned yet (its request pins each adapter as it gets it)
        idle = sorted((s.used, k) for k, s in self._slots.items() if k != keep and self._refs[s.loaded] == 0)
        for _, k in idle[:max(0, len(self._slots) - self.max_loaded)]:
            self._drop(k)


def _signature(path: Path) -> tuple:
    """Identity of an adapter's files: atomic rewrites change the inode, edits the mtime/size."""
    files = (path / WEIGHTS, path / CONFIG) if path.is_dir() else (path, path.parent / CONFIG)
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)
