"""Generation without a server: `generate` and `generate_text` run requests through a decode scheduler on the
caller's thread (core.generate.scheduler, the one decode path), and `TextSoFar` decodes a row as it grows.

A row's text depends only on its prompt, its adapter and the sampling settings (core.generate.sampler), so
it is the same here, in the studio's Compare beside other users' requests, and in the CLI's compare.
"""
from __future__ import annotations

import codecs
import threading
from typing import Sequence

from core.generate.sampler import SamplingConfig, pick_tokens  # noqa: F401 - the names callers import from here
from core.generate.scheduler import DecodeScheduler
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.model.gpt import GPT

_OFFLINE_LOCK = threading.Lock()


def generate(model: GPT, prompts: Sequence[Sequence[int]], adapters: Sequence[str | None] | None = None,
             cfg: SamplingConfig | None = None) -> list[list[int]]:
    """New token ids per row (ending at, and excluding, <|endoftext|>). prompts: token ids per row; adapters:
    the adapter each row uses, None for the base (default: the base for all)."""
    cfg = cfg or SamplingConfig()
    cfg.validate()
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    names = list(adapters) if adapters is not None else [None] * len(prompts)
    groups: dict[tuple, list[int]] = {}  # rows with the same prompt are one request (one prefill)
    for i, p in enumerate(prompts):
        groups.setdefault(tuple(p), []).append(i)
    need = min(model.config.block_size, max(map(len, prompts)) + cfg.max_new_tokens)
    sched, owned = _offline(model, len(prompts), need)
    try:
        reqs = [(rows, sched.submit(list(p), [names[i] for i in rows], cfg)) for p, rows in groups.items()]
        sched.run_until_idle()
        out: list[list[int]] = [[] for _ in prompts]
        for rows, req in reqs:
            for i, tokens in zip(rows, req.result(0)):
                out[i] = tokens
        return out
    finally:
        if owned:
            _OFFLINE_LOCK.release()


def _offline(model: GPT, rows: int, max_len: int):
    """A thread-less decode scheduler for `rows` rows of `max_len` tokens: the model's cached one when it is
    free and large enough (its captured CUDA graphs are kept), else a new one (cached if the lock is free).
    Returns it and whether this call holds `_OFFLINE_LOCK` (release it when done)."""
    owned = _OFFLINE_LOCK.acquire(blocking=False)
    cached = model.__dict__.get("_offline_scheduler") if owned else None
    if cached is not None and cached.max_rows >= rows and cached.max_len >= max_len:
        return cached, owned
    sched = DecodeScheduler(model, max_rows=rows, max_len=max_len, max_queue=rows, max_rows_per_user=rows,
                            thread=False)
    if owned:
        model.__dict__["_offline_scheduler"] = sched
    return sched, owned


def generate_text(model: GPT, prompt: str, adapters: Sequence[str | None] = (None,),
                  cfg: SamplingConfig | None = None) -> list[str]:
    """One prompt continued by each of `adapters` in one batch (None = base)."""
    ids = tokenizer.encode(prompt) or [EOT_TOKEN]
    rows = generate(model, [ids] * len(adapters), list(adapters), cfg)
    return [tokenizer.decode(r) for r in rows]


class TextSoFar:
    """One row's text, decoded as tokens arrive: each token's bytes are decoded once.

    A character split over several tokens (emoji, CJK: a UTF-8 sequence cut between tokens) is held
    back until its last byte arrives and shown meanwhile as U+FFFD, so `text` is always exactly
    what decoding the whole row so far would give.
    """

    def __init__(self):
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._done = ""  # the complete characters
        self.text = ""

    def add(self, token: int) -> None:
        self._done += self._utf8.decode(tokenizer.get_encoding().decode_single_token_bytes(token))
        pending = self._utf8.getstate()[0]  # the start of an unfinished character, if any
        self.text = self._done + pending.decode("utf-8", "replace") if pending else self._done
