"""Scoring text under several models at once: the base and up to 8 adapters in one batched pass.

`evaluate_models` measures each model's mean next-token loss on the same windows of a token split
(the windows core.train.trainer.evaluate reads): every window is repeated once per model, and per-row
routing (core.lora.layers.make_route) sends each copy through its own adapter, so the base runs once
per forward for all of them. `token_differences` scores one text under the base and one adapter (two
rows of one forward) and returns, per token, how much likelier the adapter makes it.

The vocabulary logits are never held whole for more rows than LOGITS_BUDGET allows: the forward yields
hidden states, and the loss is computed from them in pieces of rows (core.train.estimate's rule).
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.device import GUARD, autocast_for
from core.lora.layers import make_route
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.train.data import eval_windows, masked_targets
from core.train.estimate import LOGITS_BUDGET
from core.train.trainer import EVAL_TOKENS, Stopped

MAX_MODELS = 9  # the base + 8 adapters in one evaluation


@dataclass
class ModelScore:
    name: str | None  # the adapter's name as the caller gave it (None = the base alone)
    loss: float  # mean next-token cross entropy in nats over the evaluated tokens
    ppl: float  # perplexity, exp(loss) (capped at exp(50) so it stays a finite number)
    tokens: int  # tokens predicted (each window's targets), the same for every model


@dataclass
class Evaluation:
    scores: list[ModelScore]  # one per model, in the order asked
    tokens: int  # tokens each model predicted
    windows: int  # windows of seq_len + 1 tokens read (the split, or an even sample of it)
    seq_len: int  # context of each window
    seconds: float  # wall time of the one batched pass (all models together)
    forwards: int  # forward passes it took (each holding every model's copy of some windows)

    def as_dict(self) -> dict:
        return {"scores": [dict(s.__dict__) for s in self.scores], "tokens": self.tokens, "windows": self.windows,
                "seq_len": self.seq_len, "seconds": self.seconds, "forwards": self.forwards}


class TokenDiff(NamedTuple):
    text: str  # the token's own text
    logp_base: float  # its log-probability under the base, given the tokens before it
    logp_adapter: float  # ... under the adapter
    diff: float  # logp_adapter - logp_base: > 0 the adapter makes the token likelier, < 0 less likely


def check_models(names: Sequence) -> list:
    """The models of one evaluation: 1 to MAX_MODELS, each once (ValueError otherwise)."""
    names = list(names)
    if not names:
        raise ValueError("choose at least one model to evaluate (the base or an adapter).")
    if len(names) > MAX_MODELS:
        raise ValueError(f"evaluate at most {MAX_MODELS} models at once (the base and 8 adapters); got {len(names)}.")
    if len(set(names)) != len(names):
        raise ValueError("each model can be chosen once.")
    return names


def check_settings(seq_len: int, max_tokens: int, block: int) -> None:
    """ValueError unless 1 <= seq_len <= block (the model's context) and 1 <= max_tokens <= EVAL_TOKENS."""
    if not 1 <= seq_len <= block:
        raise ValueError(f"the sequence length must be from 1 to the model's context of {block} (got {seq_len}).")
    if not 1 <= max_tokens <= EVAL_TOKENS:
        raise ValueError(f"the tokens to evaluate must be from 1 to {EVAL_TOKENS:,} (got {max_tokens:,}).")


def _nll(model, h: torch.Tensor, targets: torch.Tensor, budget: int = LOGITS_BUDGET) -> torch.Tensor:
    """Per-token negative log-likelihood (rows, T), fp32, from hidden states (rows, T, d): the logits of
    at most `budget` bytes' worth of rows exist at once (at least one row)."""
    rows, T = targets.shape
    step = max(1, budget // (T * model.config.vocab_size * 4))
    w = model.lm_head.weight
    out = []
    for i in range(0, rows, step):
        logits = F.linear(h[i:i + step], w).float()
        out.append(F.cross_entropy(logits.flatten(0, 1), targets[i:i + step].flatten(), reduction="none")
                   .view(-1, T))
    return torch.cat(out)


def windows_per_forward(models: int, seq_len: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Windows read per forward: as many as fit the logits budget with every model's copy (at least one)."""
    return max(1, budget // (seq_len * vocab * 4) // models)


@torch.no_grad()
def evaluate_models(model, names: Sequence[str | None], ids: np.ndarray, seq_len: int = 128,
                    max_tokens: int = EVAL_TOKENS, lock=None, stop: threading.Event | None = None,
                    budget: int = LOGITS_BUDGET, mask: np.ndarray | None = None) -> Evaluation:
    """Mean loss of each model in `names` (loaded adapter names, None = the base) on the windows of `ids`
    that core.train.trainer.evaluate reads at this seq_len (at most max_tokens tokens), in one batched pass.

    lock: held around each forward (the engine's: nobody changes the model's adapters mid-forward).
    stop: checked between forwards (raises core.train.trainer.Stopped).
    mask: a split's loss mask (instruction data): the mean is over response tokens only (masked mean)."""
    names = check_models(names)
    check_settings(seq_len, max_tokens, model.config.block_size)
    if len(ids) < 2:
        raise ValueError(f"evaluation needs at least 2 tokens (got {len(ids)}); use a longer text or split.")
    windows = eval_windows(np.asarray(ids), seq_len, max(1, max_tokens // seq_len))
    masks = eval_windows(np.asarray(mask), seq_len, max(1, max_tokens // seq_len)) if mask is not None \
        else [np.ones(len(w), dtype=np.uint8) for w in windows]  # the same windows (they depend on the length)
    M, dev = len(names), model.device
    per = windows_per_forward(M, seq_len, model.config.vocab_size, budget)
    totals = torch.zeros(M, dtype=torch.float64, device=dev)
    count, forwards, start = 0, 0, time.perf_counter()
    lock = lock if lock is not None else contextlib.nullcontext()
    for i in range(0, len(windows), per):
        group, gmask = windows[i:i + per], masks[i:i + per]
        for length in sorted({len(w) for w in group}):  # only the last window may be shorter
            if stop is not None and stop.is_set():
                raise Stopped
            win = torch.from_numpy(np.stack([w for w in group if len(w) == length]).astype(np.int64)).to(dev)
            keep = torch.from_numpy(np.stack([m for w, m in zip(group, gmask) if len(w) == length])[:, 1:] > 0)
            rows = win.repeat_interleave(M, dim=0)  # window k's copy for model j is row k * M + j
            targets = masked_targets(rows[:, 1:], keep.repeat_interleave(M, dim=0))
            with lock, GUARD.shared(dev.type == "cuda"), autocast_for(model):
                h = model.hidden(rows[:, :-1], make_route(model, names * len(win)))
                nll = _nll(model, h, targets, budget)  # 0 at ignored targets
            totals += nll.double().sum(1).view(len(win), M).sum(0)
            count += int(keep.sum())
            forwards += 1
    seconds = time.perf_counter() - start
    if count == 0:  # only prompt tokens were read: there is no response to score (not 0 / 0 = NaN)
        raise ValueError("the evaluated windows hold no response tokens (only prompts); evaluate more tokens.")
    losses = (totals / count).tolist()
    scores = [ModelScore(n, loss, math.exp(min(loss, 50.0)), count) for n, loss in zip(names, losses)]
    return Evaluation(scores, count, len(windows), seq_len, seconds, forwards)


def text_ids(text: str) -> np.ndarray:
    """Pasted text as the token ids to evaluate on (read after <|endoftext|>, like a dataset's documents)."""
    ids = tokenizer.encode(text) if isinstance(text, str) else []
    if len(ids) < 1:
        raise ValueError("there is no text to evaluate on; paste some text or pick a dataset.")
    return np.asarray([EOT_TOKEN] + ids, dtype=np.int64)


@torch.no_grad()
def token_differences(model, text: str, adapter: str, lock=None) -> list[TokenDiff]:
    """Each token of `text` with its log-probability under the base and under `adapter` (a loaded name),
    from one forward of two rows. The text is read after <|endoftext|>, so its first token is scored too."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("there is no text to score; write or paste some text.")
    block = model.config.block_size
    if len(ids) + 1 > block:
        raise ValueError(f"the text is {len(ids):,} tokens; the model reads at most {block - 1:,} after the "
                         f"start token. Shorten the text.")
    dev = model.device
    row = torch.tensor([EOT_TOKEN] + ids, dtype=torch.long, device=dev)
    rows = row.expand(2, -1)
    lock = lock if lock is not None else contextlib.nullcontext()
    with lock, GUARD.shared(dev.type == "cuda"), autocast_for(model):
        h = model.hidden(rows[:, :-1], make_route(model, [None, adapter]))
        logp = -_nll(model, h, rows[:, 1:])
    base, tuned = logp[0].tolist(), logp[1].tolist()
    return [TokenDiff(s, b, a, a - b) for s, b, a in zip(tokenizer.token_strings(ids), base, tuned)]
