"""GPT-2 in plain PyTorch with Hugging Face module names, so checkpoints map 1:1.

Each projection takes an optional `route` (which LoRA adapter each row uses); the plain
model ignores it and core.lora.layers's wrappers read it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.device import sums_in_fp32_while_generating
from core.model import loss as ce_loss
from core.model.config import ATTN_OUT, ATTN_QKV, MLP_DOWN, MLP_UP, GPTConfig, target_shapes


class Conv1D(nn.Module):
    """GPT-2's projection, weight shaped (in, out) as in HF checkpoints.

    The shape stays (in, out) everywhere (merging, export, quantization read it so); on the CPU
    `GPT.use_cpu_layout` keeps its memory in nn.Linear's (out, in) order (see there why). It
    accepts (and ignores) an adapter route, so core.lora.layers can wrap it in place.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x, route=None):
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


def in_linear_order(w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of the (in, out) weight `w` in memory of its own, in (out, in) order (`GPT.use_cpu_layout`)."""
    return w.t().to(dtype or w.dtype, copy=True, memory_format=torch.contiguous_format).t()


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        shapes = target_shapes(cfg)  # (in, out) of each projection, from the one table
        self.c_attn = Conv1D(*shapes[ATTN_QKV])
        self.c_proj = Conv1D(*shapes[ATTN_OUT])

    def forward(self, x, route=None, cache=None, layer=0, mask=None):
        """cache: None, or an object whose `write(layer, k, v)` stores this layer's new keys/values and returns
        the keys/values to attend over (core.generate.kv_slots); mask: which of them each query sees (None:
        causal over `x` itself: training, evaluation, a prefill)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x, route).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.write(layer, k, v)
        kw = {"is_causal": True} if mask is None else {"attn_mask": mask}
        if _attention_in_fp32(q):
            if mask is not None and mask.is_floating_point():
                kw = {"attn_mask": mask.float()}
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **kw)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y, route)


def _attention_in_fp32(q: torch.Tensor) -> bool:
    """Attention on a bf16 base on the CPU, in fp32: while generating (`sums_in_fp32_while_generating`), and
    while training up to 512 tokens, where torch's fp32 attention is the faster of the two on CPUs
    (from ~1024 tokens bf16 wins; docs/performance.md, measurements behind the code)."""
    return sums_in_fp32_while_generating(q) or (q.device.type == "cpu" and q.dtype == torch.bfloat16
                                                and q.shape[-2] <= 512)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        shapes = target_shapes(cfg)
        self.c_fc = Conv1D(*shapes[MLP_UP])
        self.c_proj = Conv1D(*shapes[MLP_DOWN])

    def forward(self, x, route=None):
        h = F.gelu(self.c_fc(x, route), approximate="tanh")
        return self.c_proj(h, route)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, route=None, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln_1(x), route, cache, layer, mask)
        return x + self.mlp(self.ln_2(x), route)




class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.checkpointing = False  # recompute each block in backward: less memory, ~1/3 more time

    def forward(self, idx, route=None, cache=None, pos=None, mask=None, last_only: bool = False):
        """Logits for token ids `idx` (B, T).

        route: which adapter each row uses (see core.lora.layers.Route); None = the base alone.
        cache: where keys and values go (see Attention.forward); pos: position ids (B, T) (default 0..T-1);
        mask: attention mask (default causal).
        last_only: only the last position's logits (generation).
        """
        x = self.hidden(idx, route, cache, pos, mask)
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            if last_only:  # (B, d) @ (d, V) is one matrix product; the (B, 1, d) slice would be a batched one
                return (x[:, -1] @ self._head_t()).unsqueeze(1)
            return x @ self._head_t()
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def hidden(self, idx, route=None, cache=None, pos=None, mask=None):
        """The final hidden states (B, T, d), after ln_f, before the vocabulary projection."""
        B, T = idx.shape
        if pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.config.block_size}")
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x = checkpoint(block, x, route, None, i, mask, use_reentrant=False)
            else:
                x = block(x, route, cache, i, mask)
        return self.transformer.ln_f(x)

    def loss(self, idx, targets, route=None, chunk: int | None = None):
        """Mean next-token cross entropy (fp32) of `idx` against `targets`, both (B, T), the head and loss in
        pieces of `chunk` tokens (None: core.model.loss's rule; 0: whole)."""
        return self.mean_ce(self.hidden(idx, route), targets, chunk)

    def mean_ce(self, h, targets, chunk: int | None = None):
        """Mean cross entropy of hidden states h (B, T, d) against targets (B, T), as `loss` (core.model.loss)."""
        return ce_loss.mean_ce(h, targets, self.lm_head.weight, chunk)

    def use_cpu_layout(self) -> "GPT":
        """Hold each projection's (in, out) weight in (out, in) memory order, as nn.Linear does.

        CPU products of a few rows are faster in this order and training shapes are not slower
        (docs/performance.md); the decode scheduler runs several rows, so this order wins.
        """
        for m in self.modules():
            if isinstance(m, Conv1D) and m.weight.stride(0) != 1:
                m.weight = nn.Parameter(in_linear_order(m.weight.detach()), requires_grad=m.weight.requires_grad)
        return self

    def _head_t(self) -> torch.Tensor:
        """The tied head as (d, vocab) for CPU inference: in fp32 a transposed copy, the faster order at a
        few rows; in bf16 a view of the weight itself, since there the copy was the slower one
        (docs/performance.md)."""
        w = self.lm_head.weight
        if w.dtype != torch.float32:
            return w.detach().t()
        key = (w.data_ptr(), w._version, w.dtype)
        if getattr(self, "_head_key", None) != key:
            self._head_cache = w.detach().t().contiguous()
            self._head_key = key
        return self._head_cache

    @property
    def device(self):
        return self.transformer.wte.weight.device

    @property
    def dtype(self):
        return self.transformer.wte.weight.dtype


def init_random_(model: GPT, seed: int = 0) -> GPT:
    """GPT-2's initialisation drawn from numpy's PCG64 so every machine builds the same weights."""
    rng = np.random.default_rng(seed)
    std_proj = 0.02 / math.sqrt(2 * model.config.n_layer)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                std = std_proj if name.endswith("c_proj.weight") else 0.02
                p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape), dtype=np.float32) * std))
    return model
