"""One check for every piece of text a user types, pastes or uploads, before it reaches the engine or a page.

A lone surrogate (U+D800..U+DFFF on its own) is a valid Python str but not valid Unicode: it cannot be
encoded as UTF-8, so a page that shows it fails to serialise, for every user who polls that page.
Such text is refused at the door; `scrub` is the last line of defence for what the server sends back.
"""
from __future__ import annotations

import re

LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str, any surrogate code point is unpaired


def check_text(value, what: str, max_chars: int | None = None) -> str:
    """`value` itself when it is a str of valid Unicode within `max_chars`; else one ValueError that says
    what was wrong with `what` (never repeating the text: it may be huge or unprintable)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be text, not {type(value).__name__}.")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"{what} is {len(value):,} characters long; the limit is {max_chars:,}. "
                         f"Shorten it and try again.")
    bad = LONE_SURROGATE.search(value)
    if bad is not None:
        raise ValueError(f"{what} holds invalid Unicode (a lone surrogate, U+{ord(bad.group()):04X}) at character "
                         f"{bad.start() + 1:,}; remove that character and try again.")
    return value


def scrub(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD, so it can always be sent to a page."""
    return LONE_SURROGATE.sub("\ufffd", text) if isinstance(text, str) else text
