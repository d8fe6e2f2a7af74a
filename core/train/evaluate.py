"""Scoring text under several models at once: the base and up to 8 adapters in one batched pass.

`evaluate_models` measures each model's mean next-token loss on the same windows of a token split
(the windows core.train.trainer.evaluate reads): every window is repeated once per model, and per-row
routing (core.lora.layers.make_route) sends each copy through its own adapter, so the base runs once
per forward for all of them. `token_differences` scores one text under the base and one adapter (two
rows of one forward) and returns, per token, how much likelier the adapter makes it.

The vocabulary logits are never held whole for more rows than LOGITS_BUDGET allows: the forward yields
hidden states, and the loss is computed from them in pieces (core.model.loss's rule).

Scoring runs in chunks of bounded work (`chunk_sizes`): `evaluation` and `_score` are generators that yield
after each chunk, and `drive` runs each chunk where it is told, on a shared base as a unit of its work
loop's side work, so a Compare is not stalled behind a whole 9 x 1024-token forward and a training job's
validation can wait its turn between chunks. The chunks change no figure: each token's loss lands in the
same place of the same per-window buffer, summed in the same order as one forward would.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Generator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.device import GUARD, autocast_for
from core.lora.layers import make_route
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.train.data import eval_windows, masked_targets
from core.model.loss import LOGITS_BUDGET, rows_that_fit

MAX_MODELS = 9  # the base + 8 adapters in one evaluation
# Tokens one evaluation reads at most, whatever the batch: a validation at 4096 x 1024 would otherwise read
# 84M tokens before a run's first step, and Stop would wait for them.
EVAL_TOKENS = 32_768
Chunks = Generator[None, None, object]  # a computation that yields after each chunk of work and returns its result


class Stopped(Exception):
    """The stop flag was set during an evaluation: the rest of it is skipped."""
# multiply-adds of one chunk of scoring (one lock hold): on the tiny model, the head of ~120 tokens or the
# body of one 1,024-token row, about as long as a few decode steps of a Compare
CHUNK_WORK = 400_000_000


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
    forwards: int  # window groups scored (every model's copy of some windows; each in chunks of bounded work)

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


def chunk_sizes(config, T: int, work: int = CHUNK_WORK, budget: int = LOGITS_BUDGET) -> tuple[int, int]:
    """(rows of T tokens per body forward, token positions per head piece) of one chunk of `work`
    multiply-adds: the body costs n_layer * (12 d^2 + 2 T d) per token, the head d * vocab (at least one
    row or position; a head piece's logits also fit `budget` bytes)."""
    d, V = config.n_embd, config.vocab_size
    rows = max(1, work // (T * config.n_layer * (12 * d * d + 2 * T * d)))
    return rows, max(1, min(work // (d * V), rows_that_fit(1, V, budget)))


@torch.no_grad()
def _score(model, rows: torch.Tensor, names: list, targets: torch.Tensor, stop: threading.Event | None = None,
           work: int = CHUNK_WORK, budget: int = LOGITS_BUDGET) -> Chunks:
    """Per-token negative log-likelihood (R, T), fp32, of `rows` (R, T + 1 ids; row i under adapter names[i],
    None = the base) against `targets` (R, T; IGNORE scores 0), in chunks (`chunk_sizes`): a generator that
    yields after each chunk and returns the losses. stop: checked before each chunk (raises Stopped)."""
    R, T = targets.shape
    per, piece = chunk_sizes(model.config, T, work, budget)
    cuda, w = model.device.type == "cuda", model.lm_head.weight
    nll = torch.empty(R, T, dtype=torch.float32, device=model.device)
    for i in range(0, R, per):
        _check(stop)
        with GUARD.shared(cuda), autocast_for(model):
            h = model.hidden(rows[i:i + per, :-1], make_route(model, names[i:i + per])).flatten(0, 1)
        yield
        out, tgt = nll[i:i + per].view(-1), targets[i:i + per].flatten()
        for j in range(0, len(tgt), piece):
            _check(stop)
            with GUARD.shared(cuda), autocast_for(model):
                logits = F.linear(h[j:j + piece], w).float()
                out[j:j + piece] = F.cross_entropy(logits, tgt[j:j + piece], reduction="none")
            yield
    return nll


def drive(chunks: Chunks, run: Callable[[Callable[[], bool]], bool] | None = None):
    """Run a generator of chunks (`_score`, `evaluation`) to its end and return its value. run(fn): where each
    chunk runs (a base's work loop: core.engine.Engine.on_loop, so decoding takes turns between them);
    default: here."""
    out = []

    def one() -> bool:
        try:
            next(chunks)
            return False
        except StopIteration as end:
            out.append(end.value)
            return True
    run = run or (lambda fn: fn())
    while not run(one):
        pass
    return out[0]


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Stopped


def windows_per_forward(models: int, seq_len: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Windows read per forward: as many as fit the logits budget with every model's copy (at least one)."""
    return max(1, rows_that_fit(seq_len, vocab, budget) // models)


def evaluate_models(model, names: Sequence[str | None], ids: np.ndarray, seq_len: int = 128,
                    max_tokens: int = EVAL_TOKENS, stop: threading.Event | None = None, budget: int = LOGITS_BUDGET,
                    mask: np.ndarray | None = None, run: Callable | None = None, work: int = CHUNK_WORK) -> Evaluation:
    """Mean loss of each model in `names` (loaded adapter names, None = the base) on the windows of `ids`
    (at most max_tokens tokens), in one batched pass: `evaluation`, its chunks run by `run` (`drive`)."""
    return drive(evaluation(model, names, ids, seq_len, max_tokens, stop, budget, mask, work), run)


@torch.no_grad()
def evaluation(model, names: Sequence[str | None], ids: np.ndarray, seq_len: int = 128,
               max_tokens: int = EVAL_TOKENS, stop: threading.Event | None = None, budget: int = LOGITS_BUDGET,
               mask: np.ndarray | None = None, work: int = CHUNK_WORK) -> Chunks:
    """`evaluate_models` as chunks: a generator that yields after each chunk of bounded work and returns the
    Evaluation. It is also a training run's validation (core.train.trainer), so both read the same figure.

    stop: checked between chunks (raises Stopped). work: a chunk's multiply-adds.
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
    for i in range(0, len(windows), per):
        group, gmask = windows[i:i + per], masks[i:i + per]
        for length in sorted({len(w) for w in group}):  # only the last window may be shorter
            _check(stop)
            win = torch.from_numpy(np.stack([w for w in group if len(w) == length]).astype(np.int64)).to(dev)
            keep = torch.from_numpy(np.stack([m for w, m in zip(group, gmask) if len(w) == length])[:, 1:] > 0)
            rows = win.repeat_interleave(M, dim=0)  # window k's copy for model j is row k * M + j
            targets = masked_targets(rows[:, 1:], keep.repeat_interleave(M, dim=0))
            nll = yield from _score(model, rows, names * len(win), targets, stop, work, budget)  # 0 if ignored
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


def token_differences(model, text: str, adapter: str, run: Callable | None = None) -> list[TokenDiff]:
    """Each token of `text` with its log-probability under the base and under `adapter` (a loaded name),
    from two rows scored together (in chunks run by `run`, as evaluate_models). The text is read after
    <|endoftext|>, so its first token is scored too."""
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("there is no text to score; write or paste some text.")
    block = model.config.block_size
    if len(ids) + 1 > block:
        raise ValueError(f"the text is {len(ids):,} tokens; the model reads at most {block - 1:,} after the "
                         f"start token. Shorten the text.")
    row = torch.tensor([EOT_TOKEN] + ids, dtype=torch.long, device=model.device)
    rows = row.expand(2, -1)
    logp = -drive(_score(model, rows, [None, adapter], rows[:, 1:]), run)
    base, tuned = logp[0].tolist(), logp[1].tolist()
    return [TokenDiff(s, b, a, a - b) for s, b, a in zip(tokenizer.token_strings(ids), base, tuned)]
