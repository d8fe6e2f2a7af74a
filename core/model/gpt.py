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
from core.model.config import GPTConfig, target_shapes


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


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, n_head, max_len, head_dim)."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        shapes = target_shapes(cfg)  # (in, out) of each projection, from the one table
        self.c_attn = Conv1D(*shapes["attn.c_attn"])
        self.c_proj = Conv1D(*shapes["attn.c_proj"])

    def forward(self, x, route=None, cache=None, layer=0, start=0, mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x, route).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None and hasattr(cache, "write"):
            # a cache that places each row itself (the decode scheduler's slotted pool: every row
            # writes at its own position); it returns the keys/values to attend over, `mask` hides
            # each row's unfilled positions
            k, v = cache.write(layer, k, v)
        elif cache is not None and torch.is_tensor(start):
            # static decode (CUDA graphs): write at a position held in a tensor, attend over the
            # whole cache; `mask` says which positions are filled
            cache.k[layer].index_copy_(2, start, k)
            cache.v[layer].index_copy_(2, start, v)
            k, v = cache.k[layer], cache.v[layer]
        elif cache is not None:
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]
            v = cache.v[layer, :, :, :start + T]
        if mask is not None:
            kw = {"attn_mask": mask}
        elif start == 0:
            kw = {"is_causal": True}
        elif T == 1:  # one new query sees every cached key
            kw = {}
        else:  # several new queries after a cached prefix
            kw = {"attn_mask": causal_mask(T, start, x.device)}
        if _attention_in_fp32(q):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, **kw)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y, route)


def _attention_in_fp32(q: torch.Tensor) -> bool:
    """Attention on a bf16 base on the CPU, in fp32: while generating (`sums_in_fp32_while_generating`), and
    while training up to 512 tokens, where it is faster: torch's bf16 attention (forward + backward) took
    24 ms against 11 ms in fp32 per gpt2 layer at 4 x 128 on a CPU with AMX (from ~1024 tokens bf16 wins)."""
    return sums_in_fp32_while_generating(q) or (q.device.type == "cpu" and q.dtype == torch.bfloat16
                                                and q.shape[-2] <= 512)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        shapes = target_shapes(cfg)
        self.c_fc = Conv1D(*shapes["mlp.c_fc"])
        self.c_proj = Conv1D(*shapes["mlp.c_proj"])

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

    def forward(self, x, route=None, cache=None, layer=0, start=0, mask=None):
        x = x + self.attn(self.ln_1(x), route, cache, layer, start, mask)
        return x + self.mlp(self.ln_2(x), route)


def causal_mask(T: int, start: int, device, key_valid=None):
    """Boolean (B|1, 1, T, start+T) mask: query i sees keys <= start+i that are valid.

    A query always sees itself, so left-padding rows never produce an all-masked row.
    """
    q = torch.arange(start, start + T, device=device)[:, None]
    k = torch.arange(start + T, device=device)[None, :]
    m = k <= q
    if key_valid is not None:
        m = (m[None] & key_valid[:, None, : start + T]) | (k == q)[None]
        return m[:, None]
    return m[None, None]


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

    def forward(self, idx, route=None, cache=None, start: int = 0, pos=None, mask=None,
                last_only: bool = False):
        """Logits for token ids `idx` (B, T).

        route: which adapter each row uses (see core.lora.layers.Route); None = the active one.
        cache/start: write keys and values at positions start..start+T of a KVCache.
        pos: explicit position ids (B, T) for left-padded batches; mask: attention mask.
        last_only: only the last position's logits (generation).
        """
        x = self.hidden(idx, route, cache, start, pos, mask)
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            if last_only:  # (B, d) @ (d, V) is one matrix product; the (B, 1, d) slice would be a batched one
                return (x[:, -1] @ self._head_t()).unsqueeze(1)
            return x @ self._head_t()
        if last_only:
            x = x[:, -1:]
        return self.lm_head(x)

    def hidden(self, idx, route=None, cache=None, start: int = 0, pos=None, mask=None):
        """The final hidden states (B, T, d), after ln_f, before the vocabulary projection."""
        B, T = idx.shape
        if pos is None:
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context of {self.config.block_size}")
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        recompute = self.checkpointing and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x = checkpoint(block, x, route, None, i, start, mask, use_reentrant=False)
            else:
                x = block(x, route, cache, i, start, mask)
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

        Measured on a 2-core Xeon with AMX (torch 2.13, gpt2's 48 projections): fp32 products of 2-3
        rows took 46-49 ms in (in, out) order against 18-19 ms, 4 rows 49 against 30 ms; bf16 1 row 30
        against 20 ms; one fp32 row 15.0 against 15.7 ms; training shapes (512 rows, forward + input
        gradient) within noise either way. The decode scheduler runs several rows, so this order wins.
        """
        for m in self.modules():
            if isinstance(m, Conv1D) and m.weight.stride(0) != 1:
                m.weight = nn.Parameter(in_linear_order(m.weight.detach()), requires_grad=m.weight.requires_grad)
        return self

    def _head_t(self) -> torch.Tensor:
        """The tied head as (d, vocab) for CPU inference. In fp32 a transposed copy: 2x faster than the
        (vocab, d) order at batch 1 on an AVX-512 CPU, 1.25x on one with AMX. In bf16 a view of the weight
        itself, no copy: on the AMX CPU the copy was slower (gpt2, 2 threads: 11.7 against 8.3 ms at 1 row,
        8.6 against 7.9 at 4; `tiny` at 46 rows, the decode thread's one: 6.3 against 3.3 ms)."""
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
