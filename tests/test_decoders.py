"""Decoders: one start/step interface for the dynamic KV cache and the static (CUDA-graph) buffers."""
import random

import pytest
import torch

from core.generate import decoders as decode, sampling as generate
from core.lora import layers as lora
from core.model import tokenizer
from core.model.config import EOT_TOKEN
from core.generate.decoders import DynamicDecoder, StaticDecoder, open_decoder
from core.generate.sampling import TextSoFar

PROMPTS = [[464, 2068, 7586, 21831, 18045], [11], [464, 2068, 7586]]  # different lengths: left padding
NAMES = [None, "a", "b"]


@pytest.fixture
def model(tiny_ab):
    return tiny_ab


@torch.inference_mode()
def greedy(dec, prompts, n):
    """n greedy tokens per row through the interface alone: start, step, close."""
    try:
        logits = dec.start(prompts)
        T, rows = max(len(p) for p in prompts), [[] for _ in prompts]
        for i in range(n):
            nxt = logits[:, -1].argmax(-1)
            for row, t in zip(rows, nxt.tolist()):
                row.append(t)
            if i < n - 1:
                logits = dec.step(nxt, T + i)
        return rows
    finally:
        dec.close()


@torch.inference_mode()
def recomputed(model, prompt, name, n):
    """n greedy tokens of one row, every step a full forward of the whole sequence without a cache."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), lora.make_route(model, [name]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("prompts,names", [(PROMPTS[:1], [None]), (PROMPTS, NAMES)], ids=["one row", "padded mix"])
def test_dynamic_decoder_equals_recomputing_without_a_cache(model, prompts, names):
    n = 12
    dec = DynamicDecoder(model, lora.make_route(model, names), len(prompts), max(map(len, prompts)) + n)
    rows = greedy(dec, prompts, n)
    assert rows == [recomputed(model, p, a, n) for p, a in zip(prompts, names)]


@torch.inference_mode()  # as in generate.stream: a reused static decoder refreshes its route in place
def test_both_kinds_answer_the_same_interface_with_the_same_tokens(model):
    """The static decoder runs eagerly on the CPU (no graph): same start/step, same tokens."""
    n, route = 12, lora.make_route(model, NAMES)
    need = max(map(len, PROMPTS)) + n
    static = open_decoder(model, route, tuple(NAMES), len(PROMPTS), need, static=True)
    dynamic = open_decoder(model, route, tuple(NAMES), len(PROMPTS), need, static=False)
    assert isinstance(static, StaticDecoder) and not static.use_graph
    assert isinstance(dynamic, DynamicDecoder)
    assert greedy(static, PROMPTS, n) == greedy(dynamic, PROMPTS, n)
    # the static decoder went back to its pool and serves the next call of the same shape and mix
    again = open_decoder(model, route, tuple(NAMES), len(PROMPTS), need, static=True)
    assert again is static
    assert greedy(again, PROMPTS, n) == greedy(DynamicDecoder(model, route, len(PROMPTS), need), PROMPTS, n)


def test_selection_picks_the_dynamic_decoder_on_the_cpu(model):
    assert model.device.type == "cpu"
    dec = open_decoder(model, None, None, 2, 40)
    assert isinstance(dec, DynamicDecoder) and dec.cache.max_len == 40  # sized to the call
    dec.close()
    static = open_decoder(model, None, None, 2, 40, static=True)
    # static buffers are sized in buckets (so calls reuse one graph), capped at the context
    assert static.max_len == min(model.config.block_size, decode.BUCKET)
    static.close()


# ---- stream_text decodes only the new tokens ---------------------------------------------------

# characters whose UTF-8 bytes GPT-2 splits over several tokens (a 4-byte emoji in 2-3 tokens)
SPLIT_TEXT = "naïve café 🙂🚀 日本語の文章 👍🏽 中文字符和表情😀 Ελληνικά"


def prefixes(ids):
    return [tokenizer.decode(ids[:i + 1]) for i in range(len(ids))]


def test_text_so_far_equals_decoding_the_whole_row_at_every_token():
    ids = tokenizer.encode(SPLIT_TEXT)
    expected = prefixes(ids)
    assert sum("\ufffd" in t for t in expected) >= 5  # the text really splits characters
    row = TextSoFar()
    seen = []
    for t in ids:
        row.add(t)
        seen.append(row.text)
    assert seen == expected and seen[-1] == SPLIT_TEXT


def test_text_so_far_handles_any_byte_sequence_like_the_full_decode():
    """Random raw-byte tokens: truncated, invalid and overlong UTF-8 all decode as the whole row does."""
    enc = tokenizer.get_encoding()
    rng = random.Random(0)
    pool = [[enc.encode_single_token(bytes([b]))] for b in range(256)] + [tokenizer.encode(c) for c in "é中😀"]
    for _ in range(50):
        ids = [t for _ in range(rng.randint(1, 12)) for t in rng.choice(pool)]
        row = TextSoFar()
        for i, t in enumerate(ids):
            row.add(t)
            assert row.text == tokenizer.decode(ids[:i + 1])


def test_stream_text_yields_each_rows_text_so_far(tiny, monkeypatch):
    """Rows that end at different steps, with split characters: every yield equals decoding each row whole."""
    rows = [tokenizer.encode("🙂🚀 日本語"), tokenizer.encode(" 中文字符😀") + [EOT_TOKEN]]
    n = max(map(len, rows)) + 2
    script = [[r[i] if i < len(r) else None for r in rows] for i in range(n)]
    monkeypatch.setattr(generate, "stream", lambda *a, **k: iter(script))
    got = list(generate.stream_text(tiny, "prompt", [None, None]))
    want = [[tokenizer.decode([t for t in r[:i + 1] if t != EOT_TOKEN]) for r in rows] for i in range(n)]
    assert got == want and got[-1] == ["🙂🚀 日本語", " 中文字符😀"]
    assert any("\ufffd" in t for texts in got for t in texts)
