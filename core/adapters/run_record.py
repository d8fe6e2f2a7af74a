"""A run's record, the one reader and writer of it: studio.json (who made the adapter, from which base
and dataset, with which settings, its final losses) and history.jsonl beside it (one line per optimizer
step: step, loss, lr, grad_norm, tokens_per_sec, elapsed, wall_time, and val_loss where it evaluated).

studio.json stays a few KiB however long the run trained, so its owner and the library's checks never
depend on the run's length. The history is only ever appended to, and read line by line. A record says
how many bytes of the history are its own (`history_bytes`): a checkpoint holds a hard link to its run's
file (no copy) and reads only its own prefix while the run appends; a resume from an older checkpoint
gives the run a new file holding that prefix, so the other checkpoints keep theirs. Records written before
the history moved out hold it inline (`history`, a list); they read as before, and copies convert them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

from core import atomic, safe_json
from core.checks import MAX_PROMPT_CHARS, is_number, is_real
from core.lora.config import MAX_LOADED_ALPHA, MAX_RANK

META = "studio.json"
HISTORY = "history.jsonl"
# a studio.json written before the history moved out held every step inline (~274 bytes a step)
MAX_RECORD_BYTES = 16 * 2**20
MAX_HISTORY = 1_000_000  # points kept from such an inline history
MAX_HISTORY_BYTES = 1 << 28  # a history.jsonl in an uploaded zip (~1M steps)
MAX_LINE = 1 << 16  # a history line is ~250 bytes; a longer one is not ours and is skipped
CHART_POINTS = 2000  # points per line a chart draws of a long run (thin)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a link in a library is never followed


# ---- studio.json as found on disk: every known field checked, the rest dropped ------------------

class _Bad(ValueError):
    """A known studio.json field with a value of the wrong kind; the message says which."""


def _text(x):
    if x is not None and safe_json.text(x) is None:
        raise _Bad("is not a short valid UTF-8 string")
    return x


def _prompt(x):
    if safe_json.text(x, MAX_PROMPT_CHARS) is None:
        raise _Bad(f"is not a valid UTF-8 prompt of at most {MAX_PROMPT_CHARS} characters")
    return x


def _bool(x):
    if not isinstance(x, bool):
        raise _Bad("is not true or false")
    return x


def _date(x):
    if x is not None and safe_json.date(x) is None:
        raise _Bad(f"is not a date from {safe_json.FIRST_YEAR} to {safe_json.LAST_YEAR}")
    return x


def _num(lo=-float("inf"), hi=float("inf")):
    def check(x):
        if x is not None and safe_json.number(x, lo, hi) is None:
            raise _Bad(f"is not a finite number from {lo:g} to {hi:g}")
        return x
    return check


def _int(lo=0, hi=10**9):
    def check(x):
        if x is not None and safe_json.integer(x, lo, hi) is None:
            raise _Bad(f"is not a whole number from {lo} to {hi}")
        return x
    return check


def _record(fields: dict):
    """A JSON object whose listed keys are checked (others dropped)."""
    def check(x):
        if not isinstance(x, dict):
            raise _Bad("is not a JSON object")
        return {k: f(x[k]) for k, f in fields.items() if k in x}
    return check


def _list_of(item, limit: int):
    def check(x):
        if not isinstance(x, list) or len(x) > limit:
            raise _Bad(f"is not a list of at most {limit} items")
        return [item(v) for v in x]
    return check


def _scalar(x):
    """A training setting: text, number, bool, None, or a list of texts (sample prompts)."""
    if isinstance(x, list):
        return _list_of(_prompt, 64)(x)
    if x is None or isinstance(x, bool):
        return x
    return _num()(x) if is_number(x) else _text(x)


def _pattern(top):
    """{module regex: number}: short keys, bounded values (checked fully when the adapter is used)."""
    def check(x):
        if not isinstance(x, dict) or len(x) > 384:
            raise _Bad("is not a JSON object of at most 384 module patterns")
        return {_text(k): _num(0, top)(v) for k, v in x.items()}
    return check


def _training(x):
    if not isinstance(x, dict) or len(x) > 64:
        raise _Bad("is not a JSON object of training settings")
    return {_text(k): _scalar(v) for k, v in x.items()}


def _dataset(x):
    if isinstance(x, str) or x is None:
        return _text(x)
    return _record({"name": _text, "sha256": _text, "path": _text, "train_tokens": _int(0, 10**12),
                    "val_tokens": _int(0, 10**12)})(x)


# one history point per optimizer step (core.train.trainer); val_loss at evaluations; the last four since
# metrics export (older files lack them)
_POINT = _record({"step": _int(), "loss": _num(), "lr": _num(), "val_loss": _num(), "grad_norm": _num(),
                  "tokens_per_sec": _num(), "elapsed": _num(), "wall_time": _num()})
META_FIELDS = {  # every field this app writes to studio.json, and what it may hold
    **{k: _text for k in ("name", "base_model", "status", "user", "imported_from", "duplicated_from",
                          "restored_from")},
    "created": _date, "imported": _date, "steps": _int(), "shared": _bool,
    **{k: _num() for k in ("train_loss", "val_loss", "start_val_loss")},
    "dataset": _dataset, "training": _training, "history": _list_of(_POINT, MAX_HISTORY),
    "history_bytes": _int(0, 1 << 62),
    "lora": _record({"r": _int(1, MAX_RANK), "alpha": _num(0, MAX_LOADED_ALPHA), "dropout": _num(0, 1),
                     "targets": _list_of(_text, 8), "use_dora": _bool, "use_rslora": _bool, "init": _text,
                     "loraplus_lr_ratio": _num(0, 1000), "rank_pattern": _pattern(MAX_RANK),
                     "alpha_pattern": _pattern(MAX_LOADED_ALPHA)}),
    "blend": _list_of(_record({"name": _text, "weight": _num()}), 64),
}


def clean_meta(raw) -> tuple[dict, str | None]:
    """studio.json's known fields with checked values, and the first problem found (None if none).
    A field that fails its check is dropped; unknown fields are dropped too."""
    if not isinstance(raw, dict):
        return {}, f"{META} is not a JSON object"
    why = safe_json.problem(raw)  # anywhere, unknown fields too; the checks below have a fixed depth
    out, problem = {}, (f"{META} {why}" if why else None)
    for key, check in META_FIELDS.items():
        if key not in raw:
            continue
        try:
            out[key] = check(raw[key])
        except _Bad as e:
            problem = problem or f"{META}: {key!r} {e}"
    return out, problem


# ---- studio.json ----------------------------------------------------------------------------

def load(folder) -> dict:
    """studio.json of `folder` as found (parsed, not checked): ValueError (or OSError) with a reason."""
    path = Path(folder) / META
    raw = safe_json.load_file(path, MAX_RECORD_BYTES)
    if not isinstance(raw, dict):
        raise ValueError(f"{META} is not a JSON object")
    return raw


def read(folder) -> tuple[dict, str | None]:
    """studio.json's checked fields and the reason it is unreadable (None if fine); {} if absent or broken.
    An unreadable file keeps its owner when that field itself is sound: with sign-in, a damaged entry
    must not become anyone's to rename, delete or resume."""
    path = Path(folder) / META
    if not path.is_file():
        return {}, None
    try:
        raw = safe_json.load_file(path, MAX_RECORD_BYTES)
    except ValueError as e:
        return {}, str(e)
    meta, problem = clean_meta(raw)
    if problem:
        return ({"user": meta["user"]} if meta.get("user") else {}), problem
    return meta, None


def write(folder, meta: dict, history: Iterable[dict] | None = None) -> None:
    """The record of `folder`: `history` (default: an inline one found in `meta`) to history.jsonl first,
    then studio.json (atomically, each), which says how many bytes of the history are its own."""
    folder, meta = Path(folder), dict(meta)
    inline = meta.pop("history", None)
    if history is None and isinstance(inline, list):
        history = (p for p in map(_point, inline) if p)
    if history is not None:
        meta["history_bytes"] = write_history(folder, history)
    atomic.write_text(folder / META, json.dumps(meta, indent=2))


# ---- history.jsonl ---------------------------------------------------------------------------

def history(folder, meta: dict | None = None) -> Iterator[dict]:
    """The checked history points of the record in `folder` (its studio.json `meta`, read if not given),
    oldest first, streamed: the first `history_bytes` of history.jsonl, or an older record's inline list.
    Lines that are not sound points are skipped. `folder` None: the inline list only."""
    if meta is None:
        meta = read(folder)[0] if folder is not None else {}
    if isinstance(meta.get("history"), list) and "history_bytes" not in meta:
        yield from (p for p in map(_point, meta["history"][:MAX_HISTORY]) if p)
        return
    limit = meta.get("history_bytes")
    limit = limit if safe_json.integer(limit, 0, 1 << 62) is not None else None
    if folder is None or limit == 0:
        return
    try:
        fd = os.open(Path(folder) / HISTORY, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return
    with os.fdopen(fd, "rb") as f:
        yield from _lines(f, limit)


def _lines(f, limit: int | None) -> Iterator[dict]:
    done = 0
    while limit is None or done < limit:
        line = f.readline(MAX_LINE)
        done += len(line)
        if len(line) == MAX_LINE and not line.endswith(b"\n"):  # an overlong line: skipped to its end
            while (more := f.readline(MAX_LINE)) and not more.endswith(b"\n"):
                done += len(more)
            done += len(more)
            if not more:
                return
            continue
        if not line.endswith(b"\n") or (limit is not None and done > limit):
            return  # the end, a torn tail (a crash mid-append), or lines past this record's own
        try:
            p = _point(json.loads(line))
        except (ValueError, RecursionError):
            p = None
        if p:
            yield p


def encode(points: Iterable[dict]) -> Iterator[bytes]:
    """History lines: one compact JSON object per point; a non-finite value is left out of its line."""
    for p in points:
        clean = {k: v for k, v in p.items() if not (isinstance(v, float) and not math.isfinite(v))}
        yield (json.dumps(clean, separators=(",", ":")) + "\n").encode("utf-8")


def append(folder, points: Iterable[dict]) -> int:
    """Add `points` at the end of `folder`'s history.jsonl (fsynced); the file's size in bytes after."""
    data = b"".join(encode(points))
    Path(folder).mkdir(parents=True, exist_ok=True)  # a run's first save makes its folder
    fd = os.open(Path(folder) / HISTORY, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    with os.fdopen(fd, "ab") as f:
        before = os.fstat(f.fileno()).st_size
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except OSError:  # a full disk: no half line is left for the next append to run into
            with _quiet():
                os.ftruncate(f.fileno(), before)
            raise
        return os.fstat(f.fileno()).st_size


def _quiet():
    return contextlib.suppress(OSError)


def write_history(folder, points: Iterable[dict]) -> int:
    """Replace `folder`'s history.jsonl by `points` (a new file, atomically; none without points); its size
    in bytes."""
    size = 0

    def fill(f):
        nonlocal size
        for line in encode(points):
            size += f.write(line)
    atomic.replace_file(Path(folder) / HISTORY, fill)
    if not size:
        drop_history(folder)
    return size


def share(run, folder, nbytes: int) -> None:
    """Give checkpoint `folder` the history of `run` so far (its first `nbytes`): a hard link, as the run's
    file is only appended to (a copy of those bytes where the file system has no hard links)."""
    src, dst = Path(run) / HISTORY, Path(folder) / HISTORY
    if nbytes <= 0 or not src.is_file():
        return
    try:
        os.link(src, dst)
    except OSError:
        with open(src, "rb") as f, open(dst, "wb") as out:
            out.write(f.read(nbytes))


def adopt(run, checkpoint, meta: dict) -> int:
    """Make `run`'s history the one checkpoint folder `checkpoint` recorded (its studio.json `meta`) before
    the run resumes from it; the history's size in bytes. Nothing is written when the run's file already is
    exactly that; otherwise it becomes a new file, so checkpoints linked to the old one keep their history."""
    nbytes = meta.get("history_bytes")
    try:
        mine, theirs = os.stat(Path(run) / HISTORY), os.stat(Path(checkpoint) / HISTORY)
        if os.path.samestat(mine, theirs) and mine.st_size == nbytes:
            return nbytes
    except OSError:
        pass
    return write_history(run, history(checkpoint, meta))


def drop_history(run) -> None:
    """A new run starts without history (a file left by one that saved nothing here is removed)."""
    try:
        os.unlink(Path(run) / HISTORY)
    except FileNotFoundError:
        pass


def curve(folder, meta: dict | None = None, limit: int = CHART_POINTS) -> tuple[list[dict], list[dict]]:
    """What a chart draws of the record in `folder`: (train points, validation points), each thinned to
    about `limit` (thin), read in one pass; the validation loss before training is the first point."""
    if meta is None:
        meta = read(folder)[0]
    train, val = Thinner("loss", limit), Thinner("val_loss", limit)
    start = meta.get("start_val_loss")
    if _number(start) is not None:
        val.add({"step": 0, "val_loss": start})
    for p in history(folder, meta):
        train.add(p)
        val.add(p)
    return train.result(), val.result()


def thin(points: Iterable[dict], key: str, limit: int = CHART_POINTS) -> list[dict]:
    """The points with a number at `key`: all of them up to `limit`, else at most `limit` of them spread
    evenly, plus the last one and the lowest one, in their order (what a chart of a long run shows). A list
    is thinned by index (a page redraws its chart every tick); other iterables are streamed (Thinner)."""
    if not isinstance(points, list):
        t = Thinner(key, limit)
        for p in points:
            t.add(p)
        return t.result()
    n = len(points)
    if n <= limit:
        return [p for p in points if _number(p.get(key)) is not None]
    values = [p.get(key) for p in points]
    try:
        low = values.index(min(values))  # all numbers (a live run's points): at C speed
    except TypeError:
        low = min(range(n), key=lambda i: _number(values[i], math.inf))
    picked = sorted({*range(0, n, -(-n // limit)), n - 1, low})
    return [points[i] for i in picked if _number(points[i].get(key)) is not None]


def _number(v, otherwise=None):
    return v if is_real(v) else otherwise


class Thinner:
    """thin() one point at a time, in memory O(limit): every stride-th point is kept, and when more than
    `limit` are kept every other one is dropped and the stride doubles (between limit/2 and limit stay)."""

    def __init__(self, key: str, limit: int = CHART_POINTS):
        self.key, self.limit = key, max(2, limit)
        self.kept: list[tuple[int, dict]] = []
        self.n, self.stride = 0, 1
        self.low: tuple[int, dict] | None = None
        self.last: tuple[int, dict] | None = None

    def add(self, p: dict) -> None:
        v = _number(p.get(self.key))
        if v is None:
            return
        item = (self.n, p)
        if self.low is None or v < self.low[1][self.key]:
            self.low = item
        self.last = item
        if self.n % self.stride == 0:
            self.kept.append(item)
            if len(self.kept) > self.limit:
                self.kept, self.stride = self.kept[::2], self.stride * 2
        self.n += 1

    def result(self) -> list[dict]:
        have = {i for i, _ in self.kept}
        extra = [it for it in (self.low, self.last) if it is not None and it[0] not in have]
        extra = list({it[0]: it for it in extra}.values())  # the last may be the lowest
        return [p for _, p in sorted(self.kept + extra, key=lambda it: it[0])]


def _point(x) -> dict | None:
    """A checked history point (one with a whole-number step), or None."""
    try:
        p = _POINT(x)
    except _Bad:
        return None
    return p if isinstance(p.get("step"), int) and not isinstance(p.get("step"), bool) else None
