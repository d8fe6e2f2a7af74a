"""GPT-2 BPE built from the bundled assets/gpt2.tiktoken (sha256-checked, never fetched)."""
from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

from core.model.config import EOT_TOKEN

ASSET = Path(__file__).resolve().parents[2] / "assets" / "gpt2.tiktoken"
SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer split pattern (the same as tiktoken's r50k_base).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TokenizerFileError(RuntimeError):
    pass


def load_encoding(path: str | Path = ASSET, expected_sha256: str = SHA256) -> tiktoken.Encoding:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerFileError(
            f"GPT-2 tokenizer file {path} could not be read ({e.strerror}); restore assets/gpt2.tiktoken from the repository.") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerFileError(
            f"GPT-2 tokenizer file {path} is corrupted (sha256 {digest[:12]}..., expected {expected_sha256[:12]}...); "
            "restore assets/gpt2.tiktoken from the repository.")
    ranks = {}
    for line in data.splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN})


@functools.lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """The shared GPT-2 encoding (loaded once per process)."""
    return load_encoding()


def encode(text: str) -> list[int]:
    """Text to token ids; '<|endoftext|>' in the text is treated as the separator token."""
    return get_encoding().encode(text, allowed_special={"<|endoftext|>"})


def decode(ids) -> str:
    return get_encoding().decode([int(i) for i in ids])


def token_strings(ids) -> list[str]:
    """Each token's own text (bytes decoded leniently), for the token view."""
    enc = get_encoding()
    return [enc.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace") for i in ids]
