"""Our GPT-2 equals transformers' GPT2LMHeadModel on the same weights, loaded through load_base."""
import pytest
import torch

from core.model.weights import load_base
from core.generate.sampling import SamplingConfig, generate
from conftest import MEDIUM_SHAPED, SMALL, write_hf_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("cfg", [SMALL, MEDIUM_SHAPED], ids=["gpt2-shaped", "gpt2-medium-shaped"])
def test_logits_and_greedy_tokens_match_transformers(tmp_path, cfg):
    folder = write_hf_checkpoint(tmp_path / "ckpt", cfg, seed=3)
    ours = load_base(str(folder), device="cpu")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    assert ours.config.n_head == cfg.n_head and ours.config.n_embd == cfg.n_embd

    idx = torch.randint(0, cfg.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx) - theirs(idx).logits).abs().max().item()
    assert diff <= 1e-4

    prompt = idx[0, :5]
    with torch.no_grad():
        ref = theirs.generate(prompt[None], max_new_tokens=20, do_sample=False, min_new_tokens=20,
                              pad_token_id=50256, eos_token_id=None)[0, 5:].tolist()
    got = generate(ours, [prompt.tolist()], None, SamplingConfig(max_new_tokens=20, temperature=0, stop_at_eot=False))[0]
    assert got == ref


def test_lm_head_is_tied_to_the_embedding(hf_small):
    m = load_base(str(hf_small), device="cpu")
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()


# The tiny base's first weights: if this changes, every adapter trained on "tiny" is orphaned.
TINY_FINGERPRINT = [0.015975823625922203, -0.004257981665432453, -0.0012357934610918164]
TINY_C_ATTN = [-0.005117806605994701, -0.004697240889072418]  # (in, out) layout


def test_tiny_preset_is_the_same_in_every_process(tiny):
    again = load_base("tiny", device="cpu")
    for (n, a), (_, b) in zip(tiny.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert tiny.transformer.wte.weight[0, :3].tolist() == pytest.approx(TINY_FINGERPRINT, abs=1e-7)
    assert tiny.transformer.h[1].attn.c_attn.weight[0, :2].tolist() == pytest.approx(TINY_C_ATTN, abs=1e-7)


def test_base_parameters_are_frozen(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
