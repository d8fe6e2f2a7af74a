"""The decode engine's parts, each alone: the KV slot manager and the model runner (eager steps, steps padded
up to their batch bucket, captured steps and their fallback)."""
import logging
import random

import pytest
import torch

from core.generate.kv_slots import KVSlots
from core.generate.runner import ModelRunner, buckets_for
from core.generate.sampling import TextSoFar
from core.lora import layers as lora
from core.model import tokenizer

PROMPTS = [[464, 2068, 7586, 21831, 18045], [11], [464, 2068, 7586], [318, 257], [40, 1101, 257, 1332]]
NAMES = [None, "a", "b", "a", None]


def replay_the_step_again(step, pool):
    """A stand-in for CUDA graph capture on the CPU: each replay runs the captured step again, reading the
    runner's fixed buffers (tokens, positions, adapter weights) exactly as a graph replay would."""
    return step


@pytest.fixture
def model(tiny_ab):
    return tiny_ab


@torch.inference_mode()
def greedy(model, prompts, names, n, **runner):
    """n greedy tokens per row through a runner: each prompt prefilled into its own slot, then n - 1 decode
    steps of all rows together (rows in slots 0..len-1)."""
    kv = KVSlots(model, rows=8, max_len=64)
    run = ModelRunner(model, kv, **runner)
    logits = torch.cat([run.prefill(p, [a], kv.allocate(1)) for p, a in zip(prompts, names)])
    pos, rows = [len(p) for p in prompts], [[] for _ in prompts]
    for i in range(n):
        tokens = logits.argmax(-1).tolist()
        for row, t in zip(rows, tokens):
            row.append(t)
        if i < n - 1:
            run.prepare(tokens, pos, list(names))
            logits = run.decode(tokens, pos, list(names))
            pos = [q + 1 for q in pos]
    return rows


@torch.inference_mode()
def recomputed(model, prompt, name, n):
    """n greedy tokens of one row, every step a full forward of the whole sequence without a cache."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), lora.make_route(model, [name]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("rows", [1, 5], ids=["one row", "mixed lengths and adapters"])
def test_eager_decode_steps_equal_recomputing_without_a_cache(model, rows):
    n = 12
    got = greedy(model, PROMPTS[:rows], NAMES[:rows], n)
    assert got == [recomputed(model, p, a, n) for p, a in zip(PROMPTS[:rows], NAMES[:rows])]


def test_a_batch_padded_up_to_its_bucket_with_dummy_rows_gives_the_unpadded_tokens(model):
    """5 rows run as a bucket of 8: 3 dummy rows (token 0 at position 0 of a free slot, the base) are masked
    out of everything the real rows see."""
    assert buckets_for(8) == [1, 2, 4, 8] and buckets_for(64) == [1, 2, 4, 8, 16, 32, 64] and buckets_for(5)[-1] == 5
    plain = greedy(model, PROMPTS, NAMES, 12)
    assert greedy(model, PROMPTS, NAMES, 12, pad=True) == plain
    assert plain[1] != plain[3] or NAMES[1] == NAMES[3]  # the adapters really change the rows


def test_captured_steps_read_fixed_buffers_and_give_the_eager_tokens(model):
    """The captured path (a bucket's fixed tokens, positions and per-row adapter weights, attention over the
    whole length bucket under the mask) gives what eager steps give."""
    plain = greedy(model, PROMPTS, NAMES, 12)
    assert greedy(model, PROMPTS, NAMES, 12, graphs=True, capture=replay_the_step_again) == plain
    assert greedy(model, PROMPTS[:3], NAMES[:3], 12, graphs=True, capture=replay_the_step_again) == plain[:3]


def test_a_capture_that_fails_is_said_once_and_the_steps_run_eagerly(model, caplog):
    calls = []

    def broken(step, pool):
        calls.append(1)
        raise RuntimeError("operation not permitted when stream is capturing (simulated)")

    plain = greedy(model, PROMPTS, NAMES, 8)
    with caplog.at_level(logging.WARNING, logger="core.generate.runner"):
        got = greedy(model, PROMPTS, NAMES, 8, graphs=True, capture=broken)
    assert got == plain
    assert len(calls) == 1  # tried once, then eager for good
    said = [r for r in caplog.records if "run eagerly" in r.getMessage()]
    assert len(said) == 1 and "simulated" in said[0].getMessage()


def test_compacting_moves_rows_down_into_the_holes_with_their_keys_and_values(model):
    kv = KVSlots(model, rows=6, max_len=16)
    assert kv.allocate(5) == [0, 1, 2, 3, 4]
    kv.k[:, 4, :, :3] = 7.0
    kv.release([1, 2])  # two rows finished
    moves = kv.compact({0: 9, 3: 9, 4: 3})
    assert moves == {3: 1, 4: 2}
    assert (kv.k[:, 2, :, :3] == 7.0).all()
    assert kv.allocate(3) == [3, 4, 5]  # the rows now sit in 0..2; the rest is free


# ---- TextSoFar decodes only the new tokens ------------------------------------------------------

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


