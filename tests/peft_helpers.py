"""The peers' side of the interoperability tests: transformers models and PEFT-made adapters (test-only)."""
from __future__ import annotations

import torch

from adapter_helpers import IDS


def hf(path):
    """transformers' GPT2LMHeadModel from an HF folder, in eval mode."""
    import transformers
    return transformers.GPT2LMHeadModel.from_pretrained(str(path)).eval()


@torch.no_grad()
def hf_logits(model):
    return model(input_ids=IDS).logits.float()


def peft_made(base_folder, folder, seed=0, r=8, alpha=16, move_magnitude=False, **options):
    """An adapter made and saved by PEFT itself on c_attn, c_proj (both) and c_fc, with `options`
    (use_dora=True, use_rslora=True, rank_pattern=...), random non-zero B and, with move_magnitude, a DoRA
    magnitude moved off its init, so every part matters; (the PEFT model, its logits)."""
    import peft
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, fan_in_fan_out=True,
                          target_modules=["c_attn", "c_proj", "c_fc"], **options)
    pm = peft.get_peft_model(hf(base_folder), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if move_magnitude and "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    pm.eval()
    pm.save_pretrained(str(folder))
    return pm, hf_logits(pm)
