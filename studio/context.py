"""What every tab shares: the one Engine (base model + adapters), its training Runs, folders, options.

Nothing here goes into gr.State: a Studio is created once per process and closed over by the tabs.
"""
from __future__ import annotations

import functools
import html
import hmac
import inspect
import math
import re
import secrets
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import gradio as gr

from core.api import (PRESETS, AdapterEntry, AdapterError, Arena, Dataset, DatasetStore, Engine, Quota, Runs,
                      SchedulerBusy, TrainingError, TrainScheduler, WeightsError, check_not_gallery, check_text,
                      default_dtype, disk_full, human_bytes, is_dataset_folder, load_dataset, precision_name,
                      read_dataset_meta, scrub, split_spec, check_preset_shape)

from .fair_queue import is_local
from .exports import make_exports_dir
from .models import CHOICES, HubProbe, availability, describe
from .zerogpu_train import ChunkScheduler

USER_ERRORS = (ValueError, WeightsError, AdapterError, TrainingError, SchedulerBusy, FileNotFoundError)
UPLOADS_KEPT_S = 3600  # Gradio's upload cache: files older than this are deleted (delete_cache)
EXPORT_MAX_AGE = 600  # seconds a download stays on the server if it was never handed to Gradio
MAX_EXPORT_BYTES = 8 * 2**30  # downloads waiting on disk at once (a gpt2-xl merge is ~6.4 GB)
BROWSER_ID = re.compile(r"[0-9a-f]{32}")  # a browser's random id (new_browser_id)
LARGEST_WHOLE = 2**53  # the largest whole number a browser's Number field sends exactly


class StreamCount:
    """How many outputs stream to pages right now (thread-safe): the Compare tab spaces each stream's
    updates by it, so the server's events per second stay bounded however many users generate."""

    def __init__(self):
        self._n = 0
        self._lock = threading.Lock()

    def __int__(self) -> int:
        return self._n

    @contextmanager
    def one(self):
        """Count one stream for the duration of the `with` block."""
        with self._lock:
            self._n += 1
        try:
            yield self
        finally:
            with self._lock:
                self._n -= 1


@dataclass
class Studio:
    engine: Engine
    datasets_dir: Path
    default_model: str = "gpt2"  # the base picked when a page opens
    weights: str | None = None  # --weights: local files for `weights_for`
    weights_for: str | None = None
    auth: bool = False  # sign-in is on: record user names; only owners (or admins) stop, resume, rename, delete
    admins: frozenset[str] = frozenset()  # --admin: signed-in users who may act on anyone's runs
    max_export_bytes: int = MAX_EXPORT_BYTES  # refuse a new download while this much waits on disk
    max_jobs_per_user: int = 1  # --max-jobs-per-user: training jobs one user may have queued or running
    train_capacity: int | None = None  # --train-capacity: tokens per shared training step (None: core's default)
    max_queued_per_user: int = 8  # --max-queued-per-user: requests one user may have waiting or running
    users_per_address: int = 4  # --users-per-address: without sign-in, one client address counts as this many users
    max_job_tokens: int | None = None  # --max-job-tokens: a job's steps x tokens per step at most
    max_job_steps: int | None = None  # --max-job-steps: a job's optimizer steps at most
    max_job_minutes: float | None = None  # --max-job-minutes: a job's training time at most (then stopped, saved)
    admin_token: str | None = None  # --admin-token: whoever gives it may stop any job (compare with is_admin_token)
    quota: Quota = field(default_factory=Quota)  # per-user disk caps, the free-space floor (admins: no caps)
    runs: Runs = field(init=False)  # every training job: core's Runs on the engine (its rules, its scheduler)
    chunked: ChunkScheduler | None = field(init=False)  # on ZeroGPU: the jobs' scheduler, jobs run in chunks
    dataset_store: DatasetStore = field(init=False)  # the named datasets in datasets_dir
    probe: HubProbe = field(default_factory=HubProbe)
    streams: StreamCount = field(default_factory=StreamCount)  # Compare outputs streaming now (the Compare tab)
    exports_dir: Path = field(init=False)
    arena_dir: Path | None = None  # --arena: the blind arena's rounds (default: 'arena' beside the library)
    arena: Arena = field(init=False)
    demo: object | None = None  # --demo: the visitors' sandboxes (studio.demo.DemoMode; auth is then on)

    def __post_init__(self):
        self.quota = replace(self.quota, admins=self.quota.admins | self.admins)
        self.dataset_store = DatasetStore(self.datasets_dir, self.quota)
        self.datasets_dir = self.dataset_store.root
        self.runs = Runs(self.engine, lambda base_id: self.base(base_id, pin=True),
                           self.max_jobs_per_user, self.train_capacity, self.max_job_tokens,
                           max(1, self.users_per_address), self.max_job_steps, self.max_job_minutes,
                           ChunkScheduler if self.engine.gpu_calls is not None else TrainScheduler)
        self.chunked = self.runs.scheduler if self.engine.gpu_calls is not None else None
        self.arena = Arena(self.arena_dir or self.engine.library_dir.parent / "arena")
        self.engine.library.quota = self.quota  # opened now: start-up sweeps what a crashed run or writer left
        self.exports_dir = make_exports_dir()  # and removes those left by servers that were killed

    @property
    def precision(self) -> str:
        """The frozen base's dtype name ('bf16', 'fp32') on this studio's device (--precision)."""
        return precision_name(self.engine.dtype or default_dtype(self.engine.device))

    @property
    def library(self):
        return self.engine.library

    # ---- base model -----------------------------------------------------------------------

    def availability(self, name: str) -> tuple[str, str]:
        return availability(name, self.weights, self.weights_for, self.probe)

    def base(self, name: str, progress: Callable[[str], None] | None = None, pin: bool = False):
        """The shared base `name`, loaded once (the first call per model loads it). pin: for a training
        run, see Engine.base (the job's end releases the pin)."""
        if name not in PRESETS:
            raise ValueError(f"unknown base model {name!r}; choose one of {', '.join(CHOICES)}.")
        busy = self.runs.scheduler.running_base()
        if busy is not None and busy != name:
            raise ValueError(f"the base model cannot change to {name} while training jobs run on {busy}; "
                             f"pick {busy}, or wait for them to end.")
        weights = self.weights if name == self.weights_for else None
        model = self.engine.base(name, weights, progress, pin=pin)
        try:
            if weights:
                check_preset_shape(model.config, name, weights, "start with the matching --model")
        except WeightsError:
            if pin:
                self.engine.unpin_base(model)
            raise
        return model

    def model_status(self, name: str) -> str:
        """Markdown: whether base `name` is available, and its size."""
        kind, text = self.availability(name)
        icon = f"<span class='dot {kind}'></span>"
        now = " · **loaded**" if self.loaded_base() == name else ""
        return f"{icon} {text}  \n<span class='muted'>{describe(name)}{now}</span>"

    def loaded_base(self) -> str | None:
        return self.engine.base_id if self.engine.model is not None else None

    # ---- datasets ---------------------------------------------------------------------------

    def dataset_path(self, name: str) -> Path:
        return self.dataset_store.path(name)

    def datasets(self, user: str | None = None) -> list[dict]:
        """Prepared datasets `user` may see (can_see), newest first: name, meta (token counts, sources), mtime."""
        return [d for d in self.dataset_store.list() if self.can_see(d["meta"].get("user"), user)]

    def dataset(self, name: str, user: str | None = None) -> Dataset:
        """Dataset `name`, loaded for `user`. Another user's private dataset is refused exactly as a missing
        one is: the answer never tells that it exists."""
        path = self.dataset_store.path(name)
        if not is_dataset_folder(path) or not self.can_see(read_dataset_meta(path).get("user"), user):
            raise ValueError(f"no dataset named '{name}'; prepare it on the Data tab or pick one from the list.")
        return load_dataset(path)

    # ---- downloads --------------------------------------------------------------------------

    def export_folder(self) -> Path:
        """A fresh private folder for one download. Folders older than EXPORT_MAX_AGE are removed, and a new
        one is refused while the downloads still on disk exceed the cap (the disk is shared by all users)."""
        now, waiting = time.time(), 0
        for old in self.exports_dir.iterdir():
            try:
                if now - old.stat().st_mtime > EXPORT_MAX_AGE:
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    waiting += sum(f.stat().st_size for f in old.rglob("*") if f.is_file())
            except OSError:
                pass
        if waiting >= self.max_export_bytes:
            raise ValueError(f"the server already holds {human_bytes(waiting)} of downloads being fetched "
                             f"(the limit is {human_bytes(self.max_export_bytes)}); try again in a few minutes.")
        self.quota.check_floor(self.exports_dir)  # downloads share the disk with everyone's work
        return Path(tempfile.mkdtemp(prefix="x-", dir=self.exports_dir))

    def drop_export(self, path) -> None:
        """Remove the export folder holding `path` once Gradio has copied the file into its own cache
        (a download otherwise sits on disk twice)."""
        if not path:
            return
        p = Path(path).resolve()
        folder = next((q for q in [p, *p.parents] if q.parent == self.exports_dir), None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    # ---- sign-in ------------------------------------------------------------------------------

    def can_see(self, owner: str | None, user: str | None, shared: bool = False) -> bool:
        """Who sees what, the one rule for datasets and adapters (lists, pickers and every use by name): with
        sign-in, an entry with an owner is private to that owner and the admins until it is shared; entries
        made before sign-in was on (no owner), and everything without sign-in, are everyone's."""
        return (not self.auth or not owner or shared is True or user == owner
                or (user is not None and user in self.admins))

    def adapters(self, user: str | None = None) -> list[AdapterEntry]:
        """The library entries that `user` may see, newest first."""
        return [e for e in self.library.list() if self.can_see(e.user, user, e.shared)]

    def check_adapter(self, name: str, user: str | None) -> None:
        """AdapterError for an adapter (or 'run@checkpoint') `user` may not see, the same one a missing name
        gets; a checkpoint is seen as its run is."""
        if self.auth:
            d = self.library.details(split_spec(name)[0] if isinstance(name, str) else name)
            if not self.can_see(d.get("user"), user, d.get("shared")):
                raise self.library.no_such(name)

    def check_owner(self, name: str, owner: str | None, user: str | None, action: str) -> None:
        """With sign-in on, only `owner` (or an admin) may `action` run/adapter `name`; unowned entries
        (made before sign-in was turned on) stay open to everyone."""
        if not self.auth or not owner or user == owner or (user is not None and user in self.admins):
            return
        raise ValueError(f"'{name}' belongs to {owner}; only they (or an admin) can {action} it.")

    def check_entry_owner(self, name: str, user: str | None, action: str) -> None:
        check_not_gallery(self.library, name, action)  # the gallery is read-only for everyone (and seen by all)
        if self.auth:
            self.check_adapter(name, user)  # another user's private entry: 'no adapter named', not whose it is
            self.check_owner(name, self.library.details(name).get("user"), user, action)

    def is_admin_token(self, token) -> bool:
        """Whether `token` is --admin-token (compared in constant time; a token of any other kind is not)."""
        if not self.admin_token or not isinstance(token, str) or not token:
            return False
        return hmac.compare_digest(token.encode("utf-8", "replace"), self.admin_token.encode("utf-8"))


def typed_name(value, what: str = "name") -> str:
    """A name typed in a text box: valid Unicode, stripped (the name rules, length included, come after)."""
    return check_text(value, what).strip()


def number(value, what: str) -> float:
    """A finite number from a Number field or an API client (None, NaN, inf and text are explained)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number (got {value}).")
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{what} is empty or not a number; enter a number.") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be a finite number (got {value}).")
    return x


def whole(value, what: str) -> int:
    """A whole number within what a browser can send exactly; the exact range is core's to check."""
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError(f"{what} is empty; enter a whole number.")
    x = number(value, what)
    if x != int(x):
        raise ValueError(f"{what} must be a whole number (got {value}).")
    if abs(x) > LARGEST_WHOLE:
        raise ValueError(f"{what} is far too large (got {value:g}); enter a smaller whole number.")
    return int(x)


def _fits(block, value) -> bool:
    """Whether `value` passes `block`'s data model (a file's), as Gradio checks it before converting."""
    model = getattr(block, "data_model", None)
    try:
        model is None or value is None or model.model_validate(value, context={"validate_meta": True})
        return True
    except Exception:
        return False


class StudioBlocks(gr.Blocks):
    """gr.Blocks whose input conversion errors are one sentence naming the input. Gradio shows API clients a
    blank "Error" when a value fails its component's conversion (text sent for a file, say): studio.inputs
    avoids that for numbers and lists, and this catches every other kind."""

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except gr.Error:
            raise
        except Exception as e:  # ComponentProcessingError, pydantic's ValidationError for a file
            if len(inputs) != len(block_fn.inputs):
                raise gr.Error(f"This action takes {len(block_fn.inputs)} values, not {len(inputs)}; send one for "
                               f"each of its parameters.", title="Cannot do that") from None
            at = re.search(r"at index (\d+)", str(e))
            block = block_fn.inputs[int(at.group(1))] if at and int(at.group(1)) < len(block_fn.inputs) \
                else next((b for b, x in zip(block_fn.inputs, inputs) if not _fits(b, x)), None)
            label = getattr(block, "label", None) or getattr(block, "elem_id", None)
            what = f"the value sent for '{scrub(str(label))[:60]}'" if label else "a value sent to this action"
            raise gr.Error(sentence(f"{what} is not of the kind that field takes; send what the page would (the "
                                    f"API page lists each parameter's type)."), title="Cannot do that") from None


def user_of(request: gr.Request | None) -> str | None:
    """The signed-in user name (None without --auth)."""
    return getattr(request, "username", None) if request is not None else None


def requester(request: gr.Request | None, browser: str | None = None) -> str | None:
    """Who asks, for per-user limits and who may stop a job: the signed-in user, else the browser (its
    random id kept in the page's local storage, so a reloaded page is the same user), else the session
    (None if unknown)."""
    user = user_of(request)
    if user is not None:
        return f"user:{user}"
    if isinstance(browser, str) and BROWSER_ID.fullmatch(browser):
        return f"browser:{browser}"
    session = getattr(request, "session_hash", None) if request is not None else None
    return f"session:{session}" if session else None


def address_of(request: gr.Request | None, studio: Studio) -> str | None:
    """Without sign-in, the client's network address, which it cannot choose as it does a browser id: a
    second key for per-user limits (None with sign-in, for this machine itself, or with the limit off)."""
    host = getattr(getattr(request, "client", None), "host", None) if request is not None else None
    if (studio.auth and studio.demo is None) or studio.users_per_address < 1 or is_local(host):
        return None  # a demo's visitors are counted by address too: their cookie is the client's choice
    return f"address:{host}"


def new_browser_id(current) -> str:
    """The page's browser id: kept if it is one, else a new random one (stored in the browser)."""
    return current if isinstance(current, str) and BROWSER_ID.fullmatch(current) else secrets.token_hex(16)


def sentence(text: str) -> str:
    """`text` with a capital first letter when it starts with a plain word; a file or adapter name
    ('many.zip holds...', 'x-1 is...') is left exactly as the user wrote it."""
    first = text.split(" ", 1)[0]
    return text[0].upper() + text[1:] if first.isalpha() and first.islower() else text


def friendly(fn, status=None):
    """Show user-facing errors (bad input, missing weights, a busy job queue, a full disk) as a warning toast
    with the message, leaving the outputs as they were: never a traceback, never red error boxes on the form.
    status: the tab's status line (one of fn's outputs), where the latest action reports: the error replaces
    it instead of a toast beside a stale line (API clients still read the warning)."""
    def report(e: Exception):
        text = scrub(str(e)) or type(e).__name__  # a message echoing bad input must still reach the page
        if isinstance(e, OSError) and e.filename:  # the system's own text holds the server's path
            text = f"{Path(e.filename).name}: {e.strerror}"
        if disk_full(e):
            text = f"not enough disk space ({e.strerror}); nothing was saved. Free some space and try again."
        gr.Warning(sentence(text), duration=12, title="Cannot do that", visible=status is None)
        # one skip() leaves every output unchanged; a dict changes only the outputs it names
        return gr.skip() if status is None else {status: f"⚠ {html.escape(sentence(text))}"}

    def handle(e: Exception):
        if isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and disk_full(e)):
            return report(e)
        raise e

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (*USER_ERRORS, OSError) as e:
                yield handle(e)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, OSError) as e:
            return handle(e)
    return wrapper
