"""A quantized frozen base (QLoRA-style): int8 per output column, or 4-bit NF4 in blocks of 64.

The weights are dequantized to the compute dtype inside each forward, so the LoRA update and
the activations stay in bf16/fp32. Embeddings, layer norms and biases are not quantized.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from core.model.config import TARGET_MODULES
from core.model.gpt import Conv1D

# The 16 NormalFloat-4 levels of QLoRA (Dettmers et al., 2023): quantiles of N(0, 1), scaled to [-1, 1].
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
NF4_BLOCK = 64  # weights sharing one absmax scale
MODES = ("int8", "nf4")


class QuantConv1D(nn.Module):
    """Drop-in for model.Conv1D with a frozen quantized (in, out) weight."""

    def __init__(self, layer: Conv1D, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}.")
        self.mode = mode
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.compute_dtype = layer.weight.dtype
        w = layer.weight.detach().float()
        if mode == "int8":
            scale = w.abs().amax(dim=0).clamp_min(1e-12) / 127.0  # one scale per output column
            self.register_buffer("q", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
        else:
            flat = w.reshape(-1, NF4_BLOCK)  # in * out is a multiple of 64 for every GPT-2 projection
            scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
            levels = NF4_LEVELS.to(w.device)
            mids = (levels[1:] + levels[:-1]) / 2
            codes = torch.bucketize(flat / scale, mids).to(torch.uint8)  # nearest level
            codes = codes.view(-1, 2)
            self.register_buffer("q", codes[:, 0] | (codes[:, 1] << 4))  # two codes per byte
            self.register_buffer("levels", levels.clone())
            scale = scale.squeeze(1)
        self.register_buffer("scale", scale.float())
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        if self.mode == "int8":
            return self.q.to(self.compute_dtype) * self.scale.to(self.compute_dtype)
        codes = torch.stack([self.q & 0xF, self.q >> 4], dim=1).view(-1, NF4_BLOCK).int()  # int32: half of int64
        w = self.levels[codes] * self.scale[:, None]
        return w.view(self.in_features, self.out_features).to(self.compute_dtype)

    def forward(self, x, route=None):
        y = _QuantMatmul.apply(x.reshape(-1, self.in_features), self)
        return y.view(*x.shape[:-1], self.out_features)


class _QuantMatmul(torch.autograd.Function):
    """x @ dequant(W) + b that dequantizes again in backward instead of keeping the bf16 weight:
    autograd would otherwise save every layer's dequantized copy, a whole bf16 model's worth."""

    @staticmethod
    def forward(ctx, x, layer: QuantConv1D):
        ctx.layer = layer
        return torch.addmm(layer.bias, x, layer.dequantize())

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize().t(), None


def quantize_base(model, mode: str) -> None:
    """Replace the four projections of every block (also those wrapped by LoRA) in place."""
    for block in model.transformer.h:
        for target in TARGET_MODULES:
            parent_name, child = target.split(".")
            parent = getattr(block, parent_name)
            layer = getattr(parent, child)
            if isinstance(getattr(layer, "base", None), Conv1D):  # wrapped by core.lora.layers: swap what it wraps
                layer.base = QuantConv1D(layer.base, mode)
            elif isinstance(layer, Conv1D):
                setattr(parent, child, QuantConv1D(layer, mode))
    model.lora_version = getattr(model, "lora_version", 0) + 1  # cached decode graphs saw the old layers


def weight_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (the tied head counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
