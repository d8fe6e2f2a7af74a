"""JSON that someone else wrote: uploads, and files in the library or datasets folder that anyone
could have edited. Nothing read here may break a listing, a page or start-up.

Python's json accepts what a browser page cannot carry: lone surrogates ("\\ud800" parses to a
str that cannot be encoded as UTF-8, so Gradio fails to serialise the page), NaN/Infinity,
1e400 (inf), and nesting deep enough to raise RecursionError. Values are therefore taken one
known field at a time through the checked getters below, and anything else is dropped.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

from core.checks import is_real, is_text, is_whole, shown

MAX_DEPTH = 32  # studio.json nests 3 levels; anything deeper is not ours
MAX_TEXT = 1000  # characters of one string value (names, paths, dates); prompts are capped elsewhere
# dates: what this app writes is 'now'; a far-future date would pin an entry to the top of a
# listing, and year 9999 overflows datetime.timestamp() in UTC-minus time zones
FIRST_YEAR, LAST_YEAR = 1990, 2100


def load_file(path: Path, limit: int) -> object:
    """Parsed JSON of `path` (at most `limit` bytes); ValueError with a one-line reason otherwise."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path.name} is {size} bytes, over the {limit} byte limit")
    return loads(path.read_bytes(), path.name)


def loads(data: bytes, name: str) -> object:
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be read") from None


def text_ok(s: str) -> bool:
    """Whether `s` can be sent to a page: encodable as UTF-8 (no lone surrogates)."""
    return is_text(s)


def problem(obj, depth: int = MAX_DEPTH) -> str | None:
    """Why `obj` (parsed JSON) cannot be shown as it is: text that is not valid UTF-8, or nesting
    deeper than `depth`. Walks without recursion, so no input can exhaust the stack here."""
    todo = [(obj, 0)]
    while todo:
        x, level = todo.pop()
        if level > depth:
            return f"nested more than {depth} levels deep"
        if isinstance(x, str) and not text_ok(x):
            return f"holds text that is not valid UTF-8 ({shown(x)[:40]!r})"
        if isinstance(x, dict):
            for k, v in x.items():
                if not text_ok(k):
                    return f"holds a key that is not valid UTF-8 ({shown(k)[:40]!r})"
                todo.append((v, level + 1))
        elif isinstance(x, list):
            todo.extend((v, level + 1) for v in x)
    return None


def text(x, limit: int = MAX_TEXT) -> str | None:
    """A valid UTF-8 string of at most `limit` characters, else None."""
    return x if is_text(x, limit) else None


def number(x, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    """A finite number (not a bool) in [lo, hi] as a float, else None."""
    return float(x) if is_real(x, lo, hi) else None


def integer(x, lo: int = 0, hi: int = 10**12) -> int | None:
    """A whole number (not a bool) in [lo, hi], else None."""
    return x if is_whole(x, lo, hi) else None


def timestamp(x) -> float | None:
    """Seconds since the epoch of an ISO date from FIRST_YEAR to LAST_YEAR, else None (never raises)."""
    if text(x, 64) is None:
        return None
    try:
        t = dt.datetime.fromisoformat(x)
        if not FIRST_YEAR <= t.year <= LAST_YEAR:
            return None
        return (t if t.tzinfo else t.astimezone()).timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def date(x) -> str | None:
    """An ISO date string that `timestamp` accepts, else None."""
    return x if timestamp(x) is not None else None
