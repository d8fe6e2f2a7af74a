"""GPT-2's vocabulary and merges in the byte-level text form of HF tokenizers and llama.cpp (GGUF's
tokenizer.ggml.tokens / merges), rebuilt from the bundled tiktoken ranks (core.model.tokenizer).

In GPT-2's BPE a token's id is its merge rank: ids 0-255 are the single bytes, id 256 + i is made by
merge i, and 50256 is <|endoftext|>. Each byte is written as a printable character (bytes_to_unicode:
' ' is 'Ġ', '\\n' is 'Ċ'), and each merge as its two halves joined by a space, in rank order.
"""
from __future__ import annotations

import functools

from core.model import tokenizer
from core.model.config import EOT_TOKEN


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the rest map to 256 + n."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """`token` merged by the ranks below `max_rank`, lowest rank first: the two halves its own merge joins."""
    parts = [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(((r, i) for r, i in pairs if r is not None and r < max_rank), default=(None, None))
        if rank is None:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


@functools.lru_cache(maxsize=1)
def byte_level_vocab() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(tokens by id, the special token last; merges 'left right' in rank order)."""
    enc = tokenizer.get_encoding()
    table = bytes_to_unicode()
    text = lambda b: "".join(table[x] for x in b)  # noqa: E731
    pieces = [enc.decode_single_token_bytes(i) for i in range(EOT_TOKEN)]
    ranks = {p: i for i, p in enumerate(pieces)}
    merges = []
    for rank, piece in enumerate(pieces):
        if len(piece) > 1:
            halves = _bpe(ranks, piece, rank)
            if len(halves) != 2:
                raise ValueError(f"token {rank} is not one merge of two lower-ranked tokens; the tokenizer "
                                 f"file is not GPT-2's.")
            merges.append(" ".join(map(text, halves)))
    tokens = [text(p) for p in pieces] + [enc.decode_single_token_bytes(EOT_TOKEN).decode("utf-8")]
    return tuple(tokens), tuple(merges)
