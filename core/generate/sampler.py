"""The sampler: sampling settings, per-request random generators, and the pick of each row's next token.

A request's rows share one uniform draw per step from the request's own generator (seeded by its
settings), so a row's text depends only on its prompt, its adapter and its settings, never on what else
runs beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64  # tokens to add after the prompt
    temperature: float = 0.8  # 0 = greedy (always the most likely token)
    top_k: int = 50  # keep only the k most likely tokens (0 = off)
    top_p: float = 1.0  # keep the smallest set with this much probability (1 = off)
    seed: int = 1234  # same seed + same settings = same text
    stop_at_eot: bool = True  # a row ends at <|endoftext|>

    def validate(self) -> None:
        """Raise ValueError with a message a user can act on (a 64-bit seed or an infinite top-k would
        otherwise fail deep inside torch with an unreadable error)."""
        from core.checks import real_number, true_or_false, whole_number
        whole_number("max new tokens", self.max_new_tokens, 1, 1024)
        real_number("temperature", self.temperature, 0, 5, "a number from 0 to 5, 0 = greedy")
        whole_number("top-k", self.top_k, 0, 50257)
        real_number("top-p", self.top_p, 0, 1, "a number in (0, 1], 1 turns it off", above=True)
        whole_number("seed", self.seed, 0, 2**63 - 1)
        true_or_false("stop at end of text", self.stop_at_eot)


def new_generator(cfg: SamplingConfig, device) -> torch.Generator:
    """A request's own random generator, seeded by its settings."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(cfg.seed))
    return gen


def pick_tokens(logits: torch.Tensor, cfg: SamplingConfig, u: torch.Tensor | None) -> torch.Tensor:
    """Next token per row from (B, V) logits; `u` (B, 1) holds each row's uniform number."""
    if cfg.temperature == 0 or u is None:
        return logits.argmax(-1)
    # select first, then scale: dividing by a positive temperature keeps the order, and the kept values are
    # divided exactly as before, without a pass over the whole vocabulary. Select in the logits' own dtype,
    # then widen only what is kept: topk and sort pick the same tokens in the same order from bf16 as from
    # its exact fp32 copy, and a whole-vocabulary fp32 copy per row costs more than the pick.
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        logits, idx = logits.topk(cfg.top_k, dim=-1)  # sorted, most likely first
    elif cfg.top_p < 1.0:
        logits, idx = logits.sort(dim=-1, descending=True)
    else:
        idx = None
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        # keep a token while the mass before it is below top_p (the first is always kept)
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= cfg.top_p, 0.0)
    cdf = probs.cumsum(-1)
    target = u * cdf[:, -1:]
    pick = (cdf < target).sum(-1, keepdim=True).clamp_max(probs.shape[-1] - 1)
    return (idx.gather(-1, pick) if idx is not None else pick).squeeze(-1)


def sample(logits: torch.Tensor, batch: Sequence[tuple[SamplingConfig, torch.Generator, list[int]]]) -> list[list[int]]:
    """The next tokens of several requests from one forward's logits (N, V): each entry of `batch` is a
    request's (settings, generator, its rows in `logits`); returns each request's tokens.

    Requests with the same settings are picked in one call: every operation of `pick_tokens` works row by
    row, so a row's token is the one a call for its request alone gives, while the per-call overhead is paid
    once per setting, not once per request. Each request draws once from its own generator."""
    groups: dict[tuple, list[int]] = {}
    for i, (cfg, _, _) in enumerate(batch):
        groups.setdefault((cfg.temperature, cfg.top_k, cfg.top_p), []).append(i)
    out: list[list[int]] = [[] for _ in batch]
    for members in groups.values():
        cfg = batch[members[0]][0]
        rows = [r for i in members for r in batch[i][2]]
        u = None
        if cfg.temperature > 0:
            draws = [torch.rand((1, 1), generator=batch[i][1], device=logits.device) for i in members]
            u = torch.cat([d.expand(len(batch[i][2]), 1) for d, i in zip(draws, members)])
        picked = pick_tokens(_rows(logits, rows), cfg, u).tolist()  # the step's one host sync per setting
        at = 0
        for i in members:
            n = len(batch[i][2])
            out[i], at = picked[at:at + n], at + n
    return out


def _rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`logits[rows]`, as a view when the rows are neighbours (the usual case), else a copy."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return logits[rows[0]:rows[0] + len(rows)]
    return logits[torch.tensor(rows, device=logits.device)]
