"""Per-module ranks and alphas (PEFT's rank_pattern / alpha_pattern) and rsLoRA scaling: which rank and
scale each wrapped projection gets. Kept apart from layers.py so the layer code stays about computing;
this module only decides numbers.
"""
from __future__ import annotations

import functools
import math
import re
import re._parser as re_parser  # re's own parse: the syntax PEFT's patterns are written in
import time
import warnings

import regex  # tiktoken's own dependency; unlike re, its matching takes a time limit

from core.checks import is_real, is_text, is_whole
from core.lora import keys
from core.model.config import TARGET_MODULES

# Patterns from a file or the command line: bounded so a hostile config cannot make matching slow
MAX_PATTERNS = 384  # one per wrapped projection of the deepest GPT-2 (48 layers x 4 targets x 2)
MAX_PATTERN_CHARS = 200


# Time one pattern may take to be matched against every module name of the deepest GPT-2 (a module name or a
# simple regex takes a small fraction of it): a regex with nested quantifiers such as '(.*)*(.*)*y' backtracks for hours in re,
# holding the GIL, so one typed or uploaded pattern would freeze every user of the studio
# (0.5 s per key, 2 s for a whole config: a loaded 2-core machine must not refuse a simple pattern by mistake)
MATCH_BUDGET_S = 0.5
PATTERNS_BUDGET_S = 2.0
ALL_MODULES = tuple(keys.module(i, t) for i in range(48) for t in TARGET_MODULES)


def pattern_key(patterns, module: str) -> str | None:
    """The first pattern key that matches `module` ('transformer.h.0.attn.c_attn'), as PEFT's
    get_pattern_key matches it: the key is a regex for a dotted suffix of the module's name."""
    for key in patterns or ():
        peft_syntax(key)
        if module in _ALL:  # a GPT-2 module name: the key's matches are found once, then looked up
            if module in _matches(key):
                return key
        elif _match(key, module, time.monotonic() + MATCH_BUDGET_S):  # a deeper custom model
            return key
    return None


_ALL = frozenset(ALL_MODULES)


@functools.lru_cache(maxsize=4096)
def _matches(key: str) -> frozenset:
    """The module names `key` matches, found once within MATCH_BUDGET_S (ValueError if it takes longer)."""
    deadline = time.monotonic() + MATCH_BUDGET_S
    return frozenset(m for m in ALL_MODULES if _match(key, m, deadline))


# PEFT matches a key with re: re.match(rf"(.*\.)?({key})$", module) (peft.utils.other.get_pattern_key). Here the
# regex package matches it, because its time limit stops a pattern that backtracks for hours, while re holds the
# GIL and cannot be stopped. A key must therefore mean the same to both: it must compile in re as PEFT wraps it,
# and hold no literal brace or bracket in re's parse. That excludes the syntax that re reads as literal characters
# but regex does not: fuzzy matching ('c_attn{e<=3}' matches every module in regex, none in re) and POSIX classes
# ('[[:alpha:]]'). Module names never hold a brace or a bracket, so such a key could only ever match by accident.
BRACKETS = frozenset(map(ord, "{}[]"))


@functools.lru_cache(maxsize=4096)
def peft_syntax(key: str) -> None:
    """ValueError unless `key` is a regex that re (PEFT) and regex (here) read alike."""
    wrapped = rf"(.*\.)?({key})$"
    try:
        with warnings.catch_warnings():  # re warns of a 'possible nested set' ('[[:alpha:]]'): refused below
            warnings.simplefilter("ignore", FutureWarning)
            re.compile(wrapped)
            tree = re_parser.parse(wrapped)
    except re.error as e:
        raise ValueError(f"{key[:80]!r} is not a valid regular expression ({e}).") from None
    if any(c in BRACKETS for c in _literals(tree)):
        raise ValueError(f"{key[:80]!r} holds a brace or bracket that is not a repeat count such as {{1,3}} or a set "
                         f"such as [0-3] (PEFT reads fuzzy matching like {{e<=1}} and classes like [[:alpha:]] as "
                         f"plain characters, which no module name holds); write module names such as "
                         f"'h.0.attn.c_attn'.")


def _literals(node):
    """The code points re's parse tree matches literally (sets included)."""
    if isinstance(node, re_parser.SubPattern):
        node = node.data
    if isinstance(node, tuple) and len(node) == 2 and node[0] is re_parser.LITERAL:
        yield node[1]
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _literals(item)


def _match(key: str, module: str, deadline: float) -> bool:
    try:
        # concurrent: the GIL is released while matching, so other users' requests run meanwhile
        return regex.match(rf"(.*\.)?({key})$", module, timeout=max(1e-6, deadline - time.monotonic()),
                           concurrent=True) is not None
    except TimeoutError:
        raise ValueError(f"the pattern {key[:80]!r} takes too long to match (a regex that backtracks); write module "
                         f"names such as 'h.0.attn.c_attn', or simple regexes such as 'h\\.[0-3]\\.attn\\.c_attn'.") \
            from None
    except regex.error as e:
        raise ValueError(f"{key[:80]!r} is not a valid regular expression ({e}).") from None


def rank_alpha(lcfg, module: str) -> tuple[int, float]:
    """(rank, alpha) of one wrapped projection under `lcfg`'s patterns."""
    rk = pattern_key(lcfg.rank_pattern, module)
    ak = pattern_key(lcfg.alpha_pattern, module)
    r = lcfg.rank_pattern[rk] if rk is not None else lcfg.r
    alpha = lcfg.alpha_pattern[ak] if ak is not None else lcfg.alpha
    return r, float(alpha)


def scaling(alpha: float, r: int, rslora: bool) -> float:
    """rsLoRA divides by sqrt(r) so the update's size does not shrink as the rank grows."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def module_names(n_layer: int, targets) -> list[str]:
    return [keys.module(i, t) for i in range(n_layer) for t in targets]


def check_patterns(lcfg, n_layer: int | None, max_rank: int, max_alpha: float) -> None:
    """Each pattern: a valid regex naming at least one wrapped module, with a sane value (ValueError)."""
    started = time.monotonic()
    for field, top, what in (("rank_pattern", max_rank, "rank"), ("alpha_pattern", max_alpha, "alpha")):
        pats = getattr(lcfg, field)
        if not isinstance(pats, dict):
            raise ValueError(f"{field} must be a JSON object of module pattern -> {what} (got {type(pats).__name__}).")
        if len(pats) > MAX_PATTERNS:
            raise ValueError(f"{field} has {len(pats)} entries; at most {MAX_PATTERNS}.")
        for key, v in pats.items():
            if not key or not is_text(key, MAX_PATTERN_CHARS):
                raise ValueError(f"{field}: each key must be a module name or regex of 1..{MAX_PATTERN_CHARS} "
                                 f"characters.")
            try:
                peft_syntax(key)
            except ValueError as e:
                raise ValueError(f"{field}: {e}") from None
            _matches(key)  # ValueError for a regex that takes too long to match, before anything else matches it
            if time.monotonic() - started > PATTERNS_BUDGET_S:
                raise ValueError(f"{field}: the patterns take too long to match (over {PATTERNS_BUDGET_S:g} s in all); "
                                 f"use fewer or simpler patterns, such as 'h.0.attn.c_attn'.")
            ok = is_whole(v, 1, top) if what == "rank" else is_real(v, 0, top) and v > 0
            if not ok:
                kind = "a whole number" if what == "rank" else "a positive number"
                raise ValueError(f"{field}: {key!r} -> {v!r}; the {what} must be {kind} up to {top:g}.")
            if n_layer is not None and not any(pattern_key([key], m) for m in module_names(n_layer, lcfg.targets)):
                raise ValueError(f"{field}: {key!r} names no wrapped module (they are transformer.h.<0..{n_layer - 1}>."
                                 f"<{'|'.join(lcfg.targets)}>); fix the name, e.g. 'h.0.attn.c_attn'.")


def param_count(lcfg, shapes: dict, n_layer: int) -> int:
    """Trainable parameters with per-layer ranks (shapes: target -> (in, out))."""
    return sum(rank_alpha(lcfg, keys.module(i, t))[0] * sum(shapes[t]) for i in range(n_layer) for t in lcfg.targets)


def mixed_ranks(lcfg, n_layer: int) -> dict[str, int]:
    """{module: rank} for modules whose rank differs from lcfg.r (the library's 'mixed' detail)."""
    out = {}
    for m in module_names(n_layer, lcfg.targets):
        r = rank_alpha(lcfg, m)[0]
        if r != lcfg.r:
            out[m] = r
    return out


def parse_pattern(text, what: str) -> dict:
    """A pattern typed as JSON text ('' or None: none); the values are checked by LoraConfig.validate."""
    import json
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if not is_text(text, 100_000):
        raise ValueError(f"{what} must be JSON text such as {{\"h.0.attn.c_attn\": 4}}.")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: objects nested thousands deep
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object such as {{\"h.0.attn.c_attn\": 4}} (got {text[:80]!r}).")
    return value
