"""The loss: next-token cross entropy from hidden states through the tied head, and the one rule for how
many rows of vocabulary logits may exist at once (LOGITS_BUDGET), which training, co-batched steps,
evaluation, scoring and the memory estimate all follow.

Training keeps a micro-batch's logits whole while they fit the budget (fastest); past it the head and
the loss run over pieces of the rows, each recomputed in the backward pass (torch.utils.checkpoint), so
the (tokens x 50257) logits never exist whole: at 16 x 1024 that is ~8 GB less at the peak, for one
extra head matmul. Evaluation (no backward) reads as many whole rows per forward as fit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.model import fused_ce

IGNORE = -100  # a target that counts in no loss (instruction data's prompt tokens; F.cross_entropy's ignore_index)
LOGITS_BUDGET = 1 << 30  # bytes of fp32 logits that may exist at once
MIN_PIECE = 256  # tokens: smaller pieces cost more in head matmuls than they save
MAX_PIECES = 8  # pieces of one loss at most


def rows_that_fit(row_tokens: int, vocab: int, budget: int | None = None) -> int:
    """How many rows of `row_tokens` tokens may have their fp32 logits at once within `budget` (default:
    LOGITS_BUDGET; at least 1)."""
    return max(1, (LOGITS_BUDGET if budget is None else budget) // (row_tokens * vocab * 4))


def piece_tokens(tokens: int, vocab: int, budget: int | None = None, live: int | None = None) -> int:
    """Tokens per piece of a training loss over `tokens` targets, when `live` tokens' logits would exist at
    once (default: these; a co-batched step: every run's, which live until its one backward): all of
    them while those fit the budget, else at most MAX_PIECES pieces of at least MIN_PIECE tokens."""
    if (tokens if live is None else live) <= rows_that_fit(1, vocab, budget):
        return tokens
    return min(tokens, max(MIN_PIECE, -(-tokens // MAX_PIECES)))


def mean_ce(h: torch.Tensor, targets: torch.Tensor, head: torch.Tensor, piece: int | None = None) -> torch.Tensor:
    """Mean cross entropy (fp32) of hidden states h (B, T, d) through `head` (vocab, d) against targets (B, T),
    in pieces of `piece` tokens (None: piece_tokens' rule; 0, or as many as the tokens: whole).

    Targets of IGNORE count in neither the sum nor the mean: a window of prompt tokens only adds nothing
    to its micro-batch's mean (windows weigh by their response tokens), and a micro-batch whose targets
    are all ignored has loss 0 and no gradient (0 / 1), never 0 / 0 = NaN."""
    h, t = h.flatten(0, 1), targets.flatten()
    keep = t != IGNORE
    n = keep.sum().clamp(min=1)
    if fused_ce.applies(h, head):  # a frozen bf16 head on the CPU: its own row chunks
        return fused_ce.linear_cross_entropy(h, head, t.masked_fill(~keep, 0), keep, n)
    piece = piece_tokens(h.shape[0], head.shape[0]) if piece is None else piece
    if piece <= 0 or h.shape[0] <= piece or not torch.is_grad_enabled():
        return ce_sum(h, t, head) / n
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], piece):
        total = total + checkpoint(ce_sum, h[i:i + piece], t[i:i + piece], head, use_reentrant=False)
    return total / n


def ce_sum(h: torch.Tensor, t: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Summed cross entropy of rows h (N, d) against t (N,), the logits in fp32 (IGNORE rows add 0)."""
    return F.cross_entropy(F.linear(h, head).float(), t, ignore_index=IGNORE, reduction="sum")
