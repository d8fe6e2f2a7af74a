"""The adapter library on disk: one PEFT-compatible folder per adapter, training checkpoints inside.

    <root>/.lock                            fcntl lock that serialises writers (processes and threads)
    <root>/<name>/adapter_model.safetensors  PEFT keys, A: r x in, B: out x r
    <root>/<name>/adapter_config.json        as PEFT writes it
    <root>/<name>/studio.json                base model, dataset, training settings, losses, created, user
    <root>/<name>/history.jsonl              the loss history, one line per step (core.adapters.run_record)
    <root>/<name>/checkpoints/step_000050/   the same three files (+ the trainer's trainer_state.pt);
                                            checkpoint_path() and checkpoint_dirs() hold this rule
    <root>/<name>/.run.lock                  fcntl lock held by the process training run <name>
    <root>/.tmp-*, .trash-*                  folders being built or deleted; never listed

A new adapter is built in a hidden temp folder and renamed into place, so it appears whole or
not at all; a delete renames the folder away first. Names are checked, never rewritten.
Every file here may have been edited by someone else: entries are read through checked
getters, and a broken one is listed as 'unreadable' with the reason, never raised.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Collection, Sequence

from core import atomic, safe_json
from core.checks import shown
from core.adapters.blend import blend_states
from core.adapters import run_record
from core.adapters.format import CONFIG, WEIGHTS, name_from_path, save_adapter, write_adapter_folder
from core.adapters.run_record import HISTORY, META, clean_meta
from core.adapters.validate import (MAX_FILE_BYTES, MAX_JSON_BYTES, PICKLE_HINT, PICKLE_SUFFIXES, AdapterError,
                                    AdapterFiles, parse_config, read_adapter, width_from_a)
from core.adapters.archive import README, extract_adapter_zip, write_adapter_zip
from core.lora import keys, variants
from core.lora.config import LoraConfig
from core.model.config import GPTConfig
from core.quota import Quota, folder_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: threads are still serialised
    fcntl = None

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Windows device names ('con', 'NUL.txt', 'com1'): such a folder cannot be made or opened there
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
CHECKPOINTS = "checkpoints"
# step_<optimizer steps>, at most 64 characters in all so that 'run@step_...' is a valid name
CHECKPOINT_RE = re.compile(r"step_([0-9]{1,59})")
TRAINER_STATE = "trainer_state.pt"  # the trainer's resume state in a checkpoint
LOADABLE = (WEIGHTS, CONFIG)  # the files without which a folder holds no adapter to load
RESUMABLE = (TRAINER_STATE,)  # the file without which a checkpoint is no point to resume from
ADAPTER_FILES = (WEIGHTS, CONFIG, META, README)  # what an adapter consists of (trainer_state.pt is not)
# ... and its loss history beside them: not counted in its size, never followed when it is a link
STALE_TMP_S = 3600  # a .tmp- folder (or an empty run folder without a RUN_LOCK) this old belongs to a crashed writer
RUN_LOCK = ".run.lock"  # flocked by the process that trains the run; free once that process is gone
UNREADABLE = "unreadable"
INTERRUPTED = "interrupted (can resume)"


def valid_name(name) -> bool:
    """1-64 letters, digits, '_', '.', '-', starting with a letter or digit; not a Windows device name."""
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name.split(".")[0].upper() not in RESERVED


def check_name(name) -> str:
    """Return `name` if it is an acceptable adapter name, else raise (names are never rewritten)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise AdapterError(
            f"invalid adapter name {shown_name(name)}: use 1-64 letters, digits, '_', '.' or '-', starting with a "
            f"letter or digit (no spaces, slashes or leading dots).")
    if not valid_name(name):
        raise AdapterError(f"invalid adapter name {name!r}: {name.split('.')[0]!r} is a reserved device name on "
                           f"Windows; choose another name.")
    return name


def split_spec(spec: str) -> tuple[str, str | None]:
    """(run, checkpoint) of a library reference: ('run', None) for 'run', ('run', 'step_000050') for
    'run@step_000050'. Neither part is checked here."""
    run, sep, ckpt = spec.partition("@")
    return run, (ckpt if sep else None)


def checkpoint_path(run, step: int) -> Path:
    """Where run folder `run` (in a library or not: the CLI may train into any folder) keeps its
    checkpoint of optimizer step `step`."""
    return Path(run) / CHECKPOINTS / f"step_{step:06d}"


def checkpoint_step(folder) -> int:
    """The optimizer step of a checkpoint folder listed by checkpoint_dirs."""
    return int(CHECKPOINT_RE.fullmatch(Path(folder).name).group(1))


def checkpoint_dirs(run, holding: Sequence[str] = LOADABLE) -> list[Path]:
    """The checkpoints of run folder `run` (in a library or not), oldest first: its folders
    checkpoints/step_<digits> that hold every file in `holding`. The default asks for a loadable
    adapter (what the library lists); the trainer asks for RESUMABLE ones.
    Links are skipped, as everywhere in a library."""
    root = Path(run) / CHECKPOINTS
    try:
        if root.is_symlink() or not root.is_dir():
            return []
        found = [c for c in root.iterdir() if CHECKPOINT_RE.fullmatch(c.name) and not c.is_symlink()
                 and c.is_dir() and all((c / f).is_file() for f in holding)]
    except OSError:  # deleted while we looked
        return []
    return sorted(found, key=lambda c: (checkpoint_step(c), c.name))


def shown_name(name) -> str:
    """The repr of a rejected name, cut short when it is long (a 1,000-character name is not repeated)."""
    text = repr(name)
    return text if len(text) <= 70 else f"{text[:60]}…' ({len(name) if isinstance(name, str) else '?'} characters)"


@dataclass
class AdapterEntry:
    name: str
    base_model: str | None
    rank: int | str | None  # "mixed" when rank_pattern gives some modules another rank (rank_detail says which)
    targets: list[str]
    alpha: float | None
    steps: int | None
    train_loss: float | None
    val_loss: float | None
    created: str
    size_bytes: int
    dataset: str | None
    status: str
    user: str | None
    n_checkpoints: int = 0  # training checkpoints under checkpoints/ (details() lists them)
    has_final: bool = True  # False while a run has only checkpoints so far
    problem: str | None = None  # why the entry is unreadable (broken files); it can still be deleted
    created_ts: float = field(default=0.0, repr=False)
    variant: str = "LoRA"  # "DoRA" when adapter_config.json sets use_dora
    rank_detail: str | None = None  # per-module ranks of a "mixed" adapter: 'default 8; h.0.attn.c_attn: 4'
    shared: bool = False  # its owner shared it with everyone (with sign-in, others see it only then)

    def to_dict(self) -> dict:
        return asdict(self)


class _LibraryLock:
    """Reentrant in one thread; an exclusive fcntl.flock on <root>/.lock across processes."""

    def __init__(self, path: Path):
        self.path, self.rlock, self.depth, self.fd = path, threading.RLock(), 0, None

    def __enter__(self):
        self.rlock.acquire()
        try:
            if self.depth == 0:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
                try:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self.fd = fd
            self.depth += 1
        except BaseException:
            self.rlock.release()
            raise
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        self.rlock.release()


_LOCKS: dict[Path, _LibraryLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(root: Path) -> _LibraryLock:
    # one lock object per library per process: flock on two descriptors would deadlock a thread
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(root, _LibraryLock(root / ".lock"))


class Library:
    def __init__(self, root="adapters", max_bytes: int = MAX_FILE_BYTES, quota: Quota | None = None):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.quota = quota or Quota()  # per-user caps and the free-space floor (the studio sets its flags')
        self._lock = _lock_for(self.root)
        self._sweep()

    # ---- reading ---------------------------------------------------------------------

    def lock(self):
        """Hold the library's writer lock (for other writers, e.g. the trainer creating a run)."""
        return self._lock

    def path(self, name: str) -> Path:
        """Folder of adapter `name`, or of a checkpoint with 'run@step_000050'. Links are refused."""
        run, ckpt = split_spec(name) if isinstance(name, str) else (name, None)
        p = self._inside(self.root / check_name(run))
        if ckpt is not None:
            p = self._inside(self._inside(p / CHECKPOINTS) / check_name(ckpt))
        if not p.is_dir():
            raise self.no_such(name)
        for f in (*ADAPTER_FILES, HISTORY):
            if (p / f).is_symlink():
                raise AdapterError(f"{name}/{f} is a symbolic link; links are not allowed in the library.")
        return p

    def read(self, name: str, cfg: GPTConfig | None = None, base_id: str | None = None) -> AdapterFiles:
        """Validated tensors + config of a library adapter (against `cfg` when given)."""
        p = self.path(name)
        if not (p / WEIGHTS).is_file():
            raise AdapterError(f"{name!r} has no final adapter yet; pick one of its checkpoints ({name}@<step>).")
        return read_adapter(p, cfg, base_id, max_bytes=self.max_bytes)

    def no_such(self, name) -> AdapterError:
        """The error for a name that is not in the library (also said of an entry the asker may not see)."""
        return AdapterError(f"no adapter named {name!r} in the library.")

    def list(self, live: Collection[str] = ()) -> list[AdapterEntry]:
        """Every adapter (runs with only checkpoints too), newest first. A run named in `live`, or
        held by a live process (hold_run), is 'training'; a run with only checkpoints otherwise
        'interrupted (can resume)'. Never raises for a broken entry: it is listed as 'unreadable'."""
        entries = [e for d in self._children() if (e := self._entry(d, live=live)) is not None]
        return sorted(entries, key=lambda e: (e.created_ts, e.name), reverse=True)

    def names(self) -> list[str]:
        return [e.name for e in self.list()]

    def details(self, name: str) -> dict:
        """The list entry plus studio.json, adapter_config.json, files and checkpoints."""
        p = self.path(name)
        e = self._entry(p, name)
        if e is None:
            raise AdapterError(f"{name!r} has no adapter files yet.")
        d = e.to_dict()
        src = p if e.has_final else checkpoint_dirs(p)[-1]
        d["path"] = str(p)
        d["meta"] = {} if e.problem else run_record.read(_record_folder(p, src))[0]
        d["config"] = {} if e.problem else _read_config(src / CONFIG)[1]
        d["files"] = {f: (src / f).stat().st_size for f in ADAPTER_FILES if (src / f).is_file()}
        d["checkpoints"] = [] if split_spec(name)[1] is not None else self.checkpoints(name)
        return d

    def checkpoints(self, name: str) -> list[dict]:
        """Training checkpoints of run `name`, oldest first; load one as '<name>@<checkpoint>'."""
        out = []
        for c in checkpoint_dirs(self.path(name)):
            meta, _ = run_record.read(c)
            out.append({
                "name": c.name, "spec": f"{name}@{c.name}", "path": str(c), "step": checkpoint_step(c),
                "train_loss": meta.get("train_loss"), "val_loss": meta.get("val_loss"),
                "created": meta.get("created") or _mtime_iso(c),
                "size_bytes": _size(c),
            })
        return out

    def history(self, name: str):
        """The loss history of adapter `name` (or 'run@step_...'), one checked point per step, streamed
        (core.adapters.run_record.history)."""
        folder = self._record(name)
        return run_record.history(folder, run_record.read(folder)[0])

    def curve(self, name: str, limit: int = run_record.CHART_POINTS) -> tuple[list[dict], list[dict]]:
        """(train points, validation points) of adapter `name` for a chart, each thinned to about `limit`."""
        folder = self._record(name)
        return run_record.curve(folder, run_record.read(folder)[0], limit)

    # ---- writing (all under the lock; each new folder appears whole or not at all) ----------

    def save(self, model, adapter_name: str, new_name: str, lcfg: LoraConfig, base_id: str,
             meta: dict | None = None) -> str:
        """Save loaded adapter `adapter_name` of `model` as library entry `new_name`."""
        def build(tmp: Path):
            save_adapter(model, adapter_name, tmp, lcfg, base_id, meta)
            read_adapter(tmp, model.config, max_bytes=self.max_bytes)  # never publish a broken adapter
        return self._create(new_name, build, (meta or {}).get("user"))

    def import_path(self, path, name: str | None = None, base_cfg: GPTConfig | None = None,
                    config_path=None, user: str | None = None) -> str:
        """Import a PEFT folder, a .zip of one, or a bare .safetensors (+ adapter_config.json beside it
        or at `config_path`). Everything is validated before anything is written. Of an uploaded
        studio.json only the known, well-formed fields are kept; `user` (the acting user) replaces its user."""
        src = Path(path)
        if not src.exists():
            raise AdapterError(f"nothing to import at {src}.")
        if src.is_file() and src.suffix.lower() in PICKLE_SUFFIXES:
            raise AdapterError(f"{src.name}: {PICKLE_HINT}")
        if name is None:
            name = name_from_path(src)
        check_name(name)
        self._check_free(name)
        with tempfile.TemporaryDirectory(prefix="lora-import-") as unpacked:
            if src.is_file() and src.suffix.lower() == ".zip":
                src = extract_adapter_zip(src, Path(unpacked), self.max_bytes)
            files = read_adapter(src, base_cfg, config_path=config_path, max_bytes=self.max_bytes)
            meta, _ = clean_meta(files.meta)  # a bad field is dropped: the upload itself is valid
            if (safe_json.timestamp(meta.get("created")) or 0) > time.time() + 86400:
                del meta["created"]  # a future date would pin the upload to the top of every listing
            meta.update(imported_from=shown(Path(path).name)[:200], imported=_now(), status="imported")
            _set_user(meta, user)
            history = run_record.history(src if src.is_dir() else src.parent, meta)  # its checked lines only
            return self._create(name, lambda tmp: write_adapter_folder(
                tmp, files.peft_tensors(), files.lcfg, files.base_id, meta, history), user)

    def blend(self, names: Sequence[str], weights: Sequence[float], new_name: str,
              base_cfg: GPTConfig | None = None, user: str | None = None) -> str:
        """A new adapter whose update is sum_k weights[k] * update(names[k]) (exact)."""
        check_name(new_name)
        self._check_free(new_name)
        parts = [self.read(n, base_cfg) for n in names]
        bases = sorted({p.base_id for p in parts if p.base_id})
        if len(bases) > 1:
            raise AdapterError(f"these adapters were made for different bases ({', '.join(bases)}); "
                               f"blend adapters of one base only.")
        if base_cfg is None and len({_width(p.state) for p in parts}) > 1:
            raise AdapterError("these adapters were made for models of different widths; they cannot be blended.")
        patterned = next((n for n, p in zip(names, parts) if p.lcfg.rank_pattern or p.lcfg.alpha_pattern), None)
        # blend_states scales each adapter by one alpha/r, per-module scales would be lost; a variant that is not
        # low-rank (DoRA) is refused there whatever its ranks, so that refusal (the one that holds) comes first
        if patterned and all(variants.of(p.lcfg).low_rank for p in parts):
            raise AdapterError(f"{patterned!r} has per-module ranks or alphas (rank_pattern/alpha_pattern); "
                               f"blending those is not supported yet: blend adapters with one rank and alpha.")
        state, lcfg = blend_states([(p.state, p.lcfg) for p in parts], list(weights))
        meta = {"status": "blend", "base_model": bases[0] if bases else None,
                "blend": [{"name": n, "weight": float(w)} for n, w in zip(names, weights)]}
        _set_user(meta, user)
        tensors = {keys.peft_key(k): v for k, v in state.items()}

        def build(tmp: Path):
            write_adapter_folder(tmp, tensors, lcfg, meta["base_model"], meta)
            read_adapter(tmp, base_cfg, max_bytes=self.max_bytes)  # held to an import's checks
        return self._create(new_name, build, user)

    def rename(self, old: str, new: str) -> str:
        check_name(new)
        with self._lock:
            src = self.path(check_name(old))
            self._check_not_live(src, old, "rename it")
            dst = self._check_free(new)
            with _disk_full_says(f"rename {old!r} to {new!r}"):
                os.rename(src, dst)
            atomic.fsync_dir(self.root)
        return new

    def delete(self, name: str) -> None:
        with self._lock:
            src = self.path(check_name(name))
            self._check_not_live(src, name, "delete it")
            trash = Path(tempfile.mkdtemp(prefix=".trash-", dir=self.root))
            os.rename(src, trash / "x")  # gone from the listing in one step
            atomic.fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)

    def duplicate(self, name: str, new_name: str, user: str | None = None) -> str:
        """A copy of `name` owned by `user` (the acting user; no owner without sign-in)."""
        src = self.path(check_name(name))
        if not (src / WEIGHTS).is_file():
            raise AdapterError(f"{name!r} has no final adapter yet; restore one of its checkpoints instead.")
        return self._copy_entry(src, new_name, {"duplicated_from": name}, user)

    def restore_checkpoint(self, name: str, checkpoint: str, new_name: str, user: str | None = None) -> str:
        """Make checkpoint `checkpoint` of run `name` a library adapter of its own, owned by `user`."""
        return self._copy_entry(self.path(f"{name}@{checkpoint}"), new_name,
                                {"restored_from": f"{name}@{checkpoint}"}, user)

    def set_shared(self, name: str, shared: bool) -> None:
        """Record in the adapter's studio.json whether its owner shares it with everyone (who sees what is
        the studio's rule); its other checked fields are written back as they were."""
        with self._lock:
            p = self.path(check_name(name))
            self._check_not_live(p, name, "share it")
            if not (p / WEIGHTS).is_file():
                raise AdapterError(f"{name!r} has no final adapter yet; share it once its run has ended.")
            meta, problem = run_record.read(p)
            if problem:
                raise AdapterError(f"{name!r} has a damaged {META}; it cannot be shared.")
            meta.pop("shared", None)
            if shared:
                meta["shared"] = True
            with _disk_full_says(f"share {name!r}"):
                run_record.write(p, meta)  # studio.json only: the history stays as it is

    # ---- runs being trained: a folder held by a live process ---------------------------------

    def reserve_run(self, name: str, user: str | None = None) -> "RunHold":
        """Create the empty folder of new run `name` for `user` and hold it for this process (release()
        or process exit frees it). An empty run folder nobody holds is swept at the next start-up,
        so a crash right after Start never blocks the name. Refused past `user`'s quota or the floor."""
        with self._lock:
            dst = self._check_free(name)
            self.check_quota(user)
            dst.mkdir()
            return _hold(dst, self) or RunHold(dst, None)

    def hold_run(self, name: str) -> "RunHold":
        """Hold existing run `name` while this process trains it (Resume); refused while another holds it."""
        with self._lock:
            p = self.path(check_name(name))
            hold = _hold(p, self)
            if hold is None:
                raise AdapterError(f"{name!r} is being trained now (by this or another process); wait for it to end.")
            return hold

    def export_zip(self, name: str, dest_dir) -> Path:
        """<dest_dir>/<name>.zip holding the adapter's files (flat, as PEFT lays them out)."""
        src = self.path(name)
        if not (src / WEIGHTS).is_file():
            raise AdapterError(f"{name!r} has no final adapter yet; restore one of its checkpoints first.")
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = dest_dir / f"{name.replace('@', '-')}.zip"
        try:
            return atomic.publish_file(out, lambda tmp: write_adapter_zip(src, tmp))
        except FileExistsError:
            raise AdapterError(f"{out} already exists; delete it or export somewhere else.") from None

    # ---- internals ---------------------------------------------------------------------

    def check_quota(self, user: str | None, adding: int = 0, new: bool = True, written: bool = False) -> None:
        """Refuse (QuotaError) a write of `user`'s past their quota or the disk's floor (core.quota.Quota.check)."""
        self.quota.check("adapters", self.root, user, lambda: self._owned(user), adding, new, written)

    def _owned(self, user: str) -> list[int]:
        """The sizes on disk of the entries `user` owns, their runs' checkpoints included."""
        return [folder_bytes(d) for d in self._children() if (e := self._entry(d)) is not None and e.user == user]

    def _create(self, name: str, build: Callable[[Path], object], user: str | None = None) -> str:
        """Build a new entry of `user`'s in a hidden temp folder, then publish it under the lock; past their
        quota (checked before the build, and with its size after it) nothing is published."""
        check_name(name)

        def checked(tmp: Path):
            build(tmp)
            self.check_quota(user, folder_bytes(tmp), written=True)
        with self._lock:
            dst = self._check_free(name)
            self.check_quota(user)
            with _disk_full_says(f"save {name!r}"):
                atomic.publish_dir(dst, checked)
        return name

    def _copy_entry(self, src: Path, new_name: str, note: dict, user: str | None) -> str:
        def build(tmp: Path):
            for f in (WEIGHTS, CONFIG, README):
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / f)  # publish_dir fsyncs it
            meta, _ = run_record.read(src)  # only checked fields (and history lines) travel to the copy
            meta.update(note)
            _set_user(meta, user)
            run_record.write(tmp, meta, run_record.history(src, meta))
        return self._create(new_name, build, user)

    def _record(self, name: str) -> Path:
        """The folder whose studio.json speaks for entry `name`: its own, else its newest checkpoint's."""
        p = self.path(name)
        ckpts = [] if (p / META).is_file() else checkpoint_dirs(p)
        return _record_folder(p, ckpts[-1] if ckpts else p)

    def _check_not_live(self, folder: Path, name: str, what: str) -> None:
        if _is_live(folder):
            raise AdapterError(f"{name!r} is being trained now; stop it first, then {what}.")

    def _check_free(self, name: str) -> Path:
        dst = self.root / check_name(name)
        if dst.exists() or dst.is_symlink():
            raise AdapterError(f"an adapter named {name!r} already exists; choose another name or delete it first.")
        return dst

    def _inside(self, p: Path) -> Path:
        if p.is_symlink():
            raise AdapterError(f"{p.name} is a symbolic link; links are not allowed in the library.")
        if not p.resolve().is_relative_to(self.root):
            raise AdapterError(f"{p.name} is outside the library.")
        return p

    def _children(self) -> list[Path]:
        try:
            kids = sorted(self.root.iterdir())
        except OSError:
            return []
        return [d for d in kids if valid_name(d.name) and not d.is_symlink() and d.is_dir()]

    def _entry(self, d: Path, name: str | None = None, live: Collection[str] = ()) -> AdapterEntry | None:
        """What the listing shows for folder `d`; None for a folder that holds no adapter (yet)."""
        try:
            final = _complete(d)
            ckpts = checkpoint_dirs(d)
            src = d if final else (ckpts[-1] if ckpts else None)
            if src is None:
                return None
            has_top = (d / META).is_file()
            top, top_problem = run_record.read(d)
            meta, meta_problem = (top, top_problem) if has_top else run_record.read(src)
            config, _, config_problem = _read_config(src / CONFIG)
            problem = top_problem or meta_problem or config_problem
            r, alpha, listed = config.get("r"), config.get("alpha"), config.get("targets")
            created = meta.get("created") or _mtime_iso(d)
            name = name or d.name
            if problem:
                status = UNREADABLE
            elif name in live or _is_live(d):
                status = "training"
            else:  # a checkpoint's status is the one it was saved with, not the run's: only the run says
                status = top.get("status") or ("complete" if final else INTERRUPTED)
            pattern = config.get("rank_pattern") or {}
            detail = (f"default {r}; " + "; ".join(f"{k}: {v}" for k, v in pattern.items())
                      if any(v != r for v in pattern.values()) else None)
            return AdapterEntry(
                name=name, base_model=_base_of(meta, config), rank="mixed" if detail else r,
                rank_detail=detail,
                targets=list(listed or (meta.get("lora") or {}).get("targets") or []), alpha=alpha,
                steps=meta.get("steps"), train_loss=meta.get("train_loss"), val_loss=meta.get("val_loss"),
                created=created, size_bytes=_size(src), dataset=_dataset(meta), status=status,
                user=meta.get("user"), shared=top.get("shared") is True, n_checkpoints=len(ckpts),
                has_final=final, problem=problem,
                created_ts=safe_json.timestamp(created) or d.stat().st_mtime,
                variant=config.get("variant", "LoRA"))
        except OSError:  # deleted or renamed while we looked
            return None

    def _sweep(self) -> None:
        """Remove what crashed writers left: .trash-* always, .tmp-* once they are stale, and run
        folders that hold no adapter and no checkpoint and that no live process holds."""
        now = time.time()
        with self._lock:
            for d in self.root.iterdir():
                try:
                    if d.name.startswith(".trash-") or (d.name.startswith(".tmp-") and now - d.stat().st_mtime > STALE_TMP_S):
                        shutil.rmtree(d, ignore_errors=True)
                    elif valid_name(d.name) and not d.is_symlink() and d.is_dir() and self._abandoned(d, now):
                        shutil.rmtree(d, ignore_errors=True)
                except OSError:
                    pass

    def _saved_nothing(self, d: Path) -> bool:
        """No adapter file and no complete checkpoint in run folder `d` (the listing skips it)."""
        return not any((d / f).exists() for f in ADAPTER_FILES) and not checkpoint_dirs(d)

    def _abandoned(self, d: Path, now: float) -> bool:
        """An empty run folder whose trainer is gone. Without a RUN_LOCK (made by code that does not
        hold runs) only once it is stale: its maker may be in the middle of starting."""
        if not self._saved_nothing(d):
            return False
        if (d / RUN_LOCK).is_file():
            return not _is_live(d)
        return now - d.stat().st_mtime > STALE_TMP_S


class RunHold:
    """This process's claim on a run folder: an exclusive flock on <run>/.run.lock. The kernel
    drops it when the process dies (even by kill -9), so no stale claim survives a crash; a
    clean release removes the marker, and the folder too if the run saved nothing."""

    def __init__(self, path: Path, fd: int | None, library: "Library | None" = None):
        self.path = path  # the run folder
        self._fd = fd  # the locked descriptor (None: nothing held, e.g. no fcntl on this system)
        self._library = library  # whose lock serialises holding, releasing and sweeping

    def release(self) -> None:
        if self._fd is None:
            return
        lib = self._library
        with lib.lock() if lib is not None else contextlib.nullcontext():
            try:
                os.unlink(self.path / RUN_LOCK)  # under the library lock: no one is taking it meanwhile
                if lib is not None and lib._saved_nothing(self.path):
                    shutil.rmtree(self.path, ignore_errors=True)  # a run that saved nothing frees its name
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _hold(folder: Path, library: "Library") -> RunHold | None:
    """Hold `folder` for this process, or None when another descriptor (process) holds it."""
    fd = os.open(folder / RUN_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    if fcntl is None:
        os.close(fd)
        return RunHold(folder, None)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return RunHold(folder, fd, library)


def _is_live(folder: Path) -> bool:
    """Whether a process holds run `folder` now (a lock on a fresh descriptor fails while it does)."""
    if fcntl is None or not (folder / RUN_LOCK).is_file():
        return False
    try:
        fd = os.open(folder / RUN_LOCK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock taken above


# ---- small helpers -----------------------------------------------------------------------

@contextlib.contextmanager
def _disk_full_says(what: str):
    """A full disk inside the block becomes an AdapterError saying so (nothing was changed)."""
    try:
        yield
    except OSError as e:
        if atomic.disk_full(e):
            raise AdapterError(f"not enough disk space to {what} in the library: {e.strerror}. Nothing was "
                               f"changed; free some space and try again.") from e
        raise


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in LOADABLE)


def _width(state: dict) -> int:
    (_, target), found = next(iter(keys.modules(state).items()))
    return width_from_a(target, state[found[keys.A]].shape)


def recorded_base(folder) -> str | None:
    """The base adapter folder `folder` says it was made for: its record's (studio.json), else its
    adapter_config.json's; both checked, None when neither says."""
    folder = Path(folder)
    return _base_of(run_record.read(folder)[0], _read_config(folder / CONFIG)[0])


def _base_of(meta: dict, config: dict) -> str | None:
    """The recorded base: the run record's (checked studio.json), else the checked adapter_config.json's."""
    return meta.get("base_model") or config.get("base")


def _record_folder(entry: Path, src: Path) -> Path:
    """An entry's own studio.json speaks for it; a run with only checkpoints so far has its newest's (`src`)."""
    return entry if (entry / META).is_file() else src


def _read_config(path: Path) -> tuple[dict, dict, str | None]:
    """adapter_config.json: (r, alpha, targets and base after validation; the file as found; the
    reason it is unreadable or None). Both dicts are {} when it is unreadable."""
    try:
        raw = safe_json.load_file(path, MAX_JSON_BYTES)
        why = safe_json.problem(raw) if isinstance(raw, dict) else "is not a JSON object"
        if why:
            return {}, {}, f"{CONFIG} {why}"
        r, alpha, _, listed, base = parse_config(raw, path)
    except ValueError as e:  # AdapterError is a ValueError too
        return {}, {}, shown(str(e))[:300]
    pattern = raw.get("rank_pattern") if isinstance(raw.get("rank_pattern"), dict) else {}
    return ({"r": r, "alpha": alpha, "targets": listed, "base": safe_json.text(base, 200),
             "variant": variants.of(LoraConfig(use_dora=raw.get("use_dora") is True)).label,
             "rank_pattern": {shown(str(k))[:200]: v for k, v in pattern.items()}}, raw, None)


def _set_user(meta: dict, user: str | None) -> None:
    """Record the acting user (the signed-in one); a user name or sharing copied or uploaded along is dropped
    (a new entry starts private to whoever made it)."""
    meta.pop("user", None)
    meta.pop("shared", None)
    if user:
        meta["user"] = shown(str(user))[:200]


def _size(folder: Path) -> int:
    return sum((folder / f).stat().st_size for f in ADAPTER_FILES if (folder / f).is_file())


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _mtime_iso(p: Path) -> str:
    try:
        return dt.datetime.fromtimestamp(p.stat().st_mtime).astimezone().isoformat(timespec="seconds")
    except (OverflowError, ValueError):  # a file dated (touch -d) beyond what datetime can hold
        return "unknown"


def _dataset(meta: dict) -> str | None:
    """The dataset's name from checked metadata (clean_meta: a str or a dict with a str name)."""
    ds = meta.get("dataset")
    return ds.get("name") if isinstance(ds, dict) else ds
