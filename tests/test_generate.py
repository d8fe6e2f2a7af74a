"""Generation: seeds, streaming, KV cache, batches that mix base and adapters."""
import pytest
import torch

from core.lora import layers as lora
from core.model import tokenizer
from core.lora.config import LoraConfig
from core.generate.sampling import SamplingConfig, generate, generate_text, pick_tokens
from adapter_helpers import randomize_b

PROMPT = tokenizer.encode("The quick brown fox")


def test_same_seed_same_text_and_different_seed_different_text(tiny):
    cfg = SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=0, seed=7)
    a = generate(tiny, [PROMPT], None, cfg)
    assert generate(tiny, [PROMPT], None, cfg) == a
    other = generate(tiny, [PROMPT], None, SamplingConfig(max_new_tokens=24, temperature=1.0, top_k=0, seed=8))
    assert other != a


def test_generate_text_is_the_decoded_tokens_of_generate(tiny):
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=3)
    tokens = generate(tiny, [PROMPT], None, cfg)[0]
    assert generate_text(tiny, "The quick brown fox", [None], cfg) == [tokenizer.decode(tokens)]


def test_kv_cache_generation_equals_recomputing_everything(tiny):
    cfg = SamplingConfig(max_new_tokens=20, temperature=0, stop_at_eot=False)
    cached = generate(tiny, [PROMPT], None, cfg)[0]
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(tiny(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(PROMPT):]


def test_batched_prompts_of_different_lengths_equal_one_by_one(tiny):
    prompts = [tokenizer.encode(t) for t in ["Hi", "A much longer prompt than the first one", "Ok then"]]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.8, seed=5, stop_at_eot=False)
    batched = generate(tiny, prompts, None, cfg)
    for p, row in zip(prompts, batched):
        assert generate(tiny, [p], None, cfg)[0] == row


def test_a_mixed_base_and_adapter_batch_equals_each_alone(tiny):
    lora.add_adapter(tiny, "a", LoraConfig(r=4, targets=("attn.c_attn",)))
    lora.add_adapter(tiny, "b", LoraConfig(r=4, targets=("mlp.c_fc",)))
    randomize_b(tiny, "a", std=0.3, seed=1)
    randomize_b(tiny, "b", std=0.3, seed=2)
    cfg = SamplingConfig(max_new_tokens=16, temperature=0.8, seed=11, stop_at_eot=False)
    together = generate(tiny, [PROMPT] * 3, [None, "a", "b"], cfg)
    alone = [generate(tiny, [PROMPT], [n], cfg)[0] for n in (None, "a", "b")]
    assert together == alone
    assert together[0] != together[1] and together[0] != together[2]


def test_top_k_one_is_greedy(tiny):
    greedy = generate(tiny, [PROMPT], None, SamplingConfig(max_new_tokens=10, temperature=0, stop_at_eot=False))
    topk1 = generate(tiny, [PROMPT], None, SamplingConfig(max_new_tokens=10, temperature=1.3, top_k=1, stop_at_eot=False))
    assert greedy == topk1


@pytest.mark.parametrize("top_k,top_p", [(50, 1.0), (50, 0.9), (0, 0.9), (0, 1.0)])
def test_sampling_from_bf16_logits_picks_what_their_fp32_copy_gives(top_k, top_p):
    """A bf16 base's logits are sampled in their own dtype (widened after top-k/top-p selection): the
    tokens equal those picked from the exact fp32 copy, ties included (bf16 has many)."""
    g = torch.Generator().manual_seed(0)
    cfg = SamplingConfig(temperature=0.8, top_k=top_k, top_p=top_p)
    for scale in (1.0, 8.0):  # 8: rounded to whole numbers, so most of the top logits tie
        logits = torch.randn(24, 50257, generator=g) * scale
        logits = (logits.round() if scale > 1 else logits).bfloat16()
        for _ in range(5):
            u = torch.rand(24, 1, generator=g)
            assert torch.equal(pick_tokens(logits, cfg, u), pick_tokens(logits.float(), cfg, u))
    assert pick_tokens(logits, cfg, u).dtype == torch.int64


def test_generation_stops_at_endoftext(tiny):
    forward = tiny.forward

    def eot_always_wins(*args, **kwargs):
        out = forward(*args, **kwargs)
        out[..., 50256] += 1000.0
        return out

    tiny.forward = eot_always_wins
    assert generate(tiny, [PROMPT], None, SamplingConfig(max_new_tokens=10, temperature=0)) == [[]]


def test_long_prompts_are_cropped_to_fit_the_context(tiny):
    long = PROMPT * 400  # 1600 tokens > 1024
    out = generate(tiny, [long], None, SamplingConfig(max_new_tokens=8, temperature=0, stop_at_eot=False))
    assert len(out[0]) == 8


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), r"temperature must be a number from 0 to 5, 0 = greedy \(got -1\)"),
    (dict(top_p=0), r"top-p must be a number in \(0, 1\], 1 turns it off \(got 0\)"),
    (dict(max_new_tokens=0), r"max new tokens must be a whole number from 1 to 1024 \(got 0\)"),
    (dict(top_k=-2), r"top-k must be a whole number from 0 to 50257 \(got -2\)"),
])
def test_bad_sampling_settings_are_refused(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny, [PROMPT], None, SamplingConfig(**bad))
