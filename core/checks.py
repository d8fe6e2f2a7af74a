"""The one home of the checks that settings and user text go through: whole and real numbers in a range,
sample prompts, and text a user types, pastes or uploads (before it reaches the engine or a page).

A lone surrogate (U+D800..U+DFFF on its own) is a valid Python str but not valid Unicode: it cannot be
encoded as UTF-8, so a page that shows it fails to serialise, for every user who polls that page.
Such text is refused at the door; `scrub` is the last line of defence for what the server sends back.
"""
from __future__ import annotations

import math
import re

MAX_PROMPTS = 8  # sample prompts continued at each evaluation
MAX_PROMPT_CHARS = 4000  # prompts: GPT-2 sees at most 1024 tokens (~4,000 characters of English) anyway

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, any surrogate code point is unpaired


def is_text(x, max_chars: int | None = None) -> bool:
    """Whether `x` is a str of valid Unicode (no lone surrogate) of at most `max_chars` characters."""
    return isinstance(x, str) and (max_chars is None or len(x) <= max_chars) and LONE_SURROGATE.search(x) is None


def is_whole(x, lo: int | None = None, hi: int | None = None) -> bool:
    """Whether `x` is an int (not a bool, not a float such as 2.0) in [lo, hi] (None: no bound)."""
    return (isinstance(x, int) and not isinstance(x, bool)
            and (lo is None or x >= lo) and (hi is None or x <= hi))


def is_number(x) -> bool:
    """Whether `x` is a number as JSON has them: an int or a float (any, NaN too), not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_real(x, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """Whether `x` is a finite int or float (not a bool, not NaN, not an int too large for a float) in
    [lo, hi]."""
    if not is_number(x):
        return False
    try:
        v = float(x)
    except OverflowError:
        return False
    return math.isfinite(v) and lo <= v <= hi


def check_text(value, what: str, max_chars: int | None = None) -> str:
    """`value` itself when it is a str of valid Unicode within `max_chars`; else one ValueError that says
    what was wrong with `what` (never repeating the text: it may be huge or unprintable)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, not {type(value).__name__}.")
    if is_text(value, max_chars):
        return value
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"{what} is {len(value):,} characters long; the limit is {max_chars:,}. "
                         f"Shorten it and try again.")
    bad = LONE_SURROGATE.search(value)  # is_text refused it: a lone surrogate, since the length is fine
    raise ValueError(f"{what} holds invalid Unicode (a lone surrogate, U+{ord(bad.group()):04X}) at character "
                     f"{bad.start() + 1:,}; remove that character and try again.")


def scrub(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, so it can always be sent to a page."""
    return LONE_SURROGATE.sub("\ufffd", text) if isinstance(text, str) else text


def shown(text: str) -> str:
    """`text` made safe to show while keeping what it said: lone surrogates written as \\udXXX escapes
    (for names in messages; `scrub` for text shown as it is)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def whole_number(name: str, v, lo: int, hi: int) -> None:
    """An int (not a bool, not a float such as inf or 2.0) in [lo, hi]."""
    if not is_whole(v, lo, hi):
        raise ValueError(f"{name} must be a whole number from {lo} to {hi} (got {v!r}).")


def true_or_false(name: str, v) -> None:
    """A bool (not 0/1, not the text 'true')."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false (got {v!r}).")


def real_number(name: str, v, lo: float, hi: float, what: str, *, above: bool = False,
                below: bool = False, hint: str = "") -> None:
    """A finite int/float in [lo, hi] (`above`/`below` make that end open); `what` says the range,
    `hint` (after the value) what to do."""
    ok = is_real(v) and (v > lo if above else v >= lo) and (v < hi if below else v <= hi)
    if not ok:
        raise ValueError(f"{name} must be {what} (got {v!r}){hint}.")


def check_prompts(prompts) -> None:
    """Sample prompts: a short list of valid texts (a lone surrogate would break every page that
    shows the run's samples, since they cannot be encoded)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or \
            not all(isinstance(p, str) for p in prompts):
        raise ValueError("sample prompts must be a list of texts.")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"use at most {MAX_PROMPTS} sample prompts (got {len(prompts)}).")
    for i, p in enumerate(prompts, 1):
        check_text(p, f"sample prompt {i}", MAX_PROMPT_CHARS)
