"""The vocabulary projection and cross entropy in one pass over row chunks, for a frozen head.

The plain path writes the (tokens x 50257) logits, casts them to fp32, takes a log-softmax over them,
keeps them for the backward pass, and then fills, casts and multiplies a gradient of the same size:
at 4 x 128 tokens that is ~100 MB per buffer, each pass a trip through memory. Here each chunk of
rows (~250 for GPT-2) is projected, its loss taken and its gradient with respect to the hidden states
computed at once, so no logits are kept for the backward pass, which only scales the saved (tokens x d)
gradient. The head gets no gradient, so this serves only a frozen base (LoRA).

The arithmetic is the plain path's: logits in the head's dtype, then fp32 for the softmax; the
gradient of the logits (softmax - one-hot, over the mean's count) cast to the head's dtype before its
product with the head. It differs from the plain path in one rounding: the loss's own gradient
(1.0 for a plain backward) multiplies the result instead of the logits' gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# One chunk's fp32 logits: large enough that each chunk's matmuls stay efficient, small enough that the
# chunk's logits stay out of the step's peak; both much smaller chunks and one unchunked pass ran slower.
CHUNK_BYTES = 48 * 2**20


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, keep, count, rows):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h)
        for i in range(0, h.shape[0], rows):
            t, k = targets[i:i + rows], keep[i:i + rows]
            logp = torch.log_softmax(F.linear(h[i:i + rows], weight).float(), dim=-1)
            picked = logp.gather(1, t[:, None]).squeeze(1)
            total -= (picked * k).sum()
            p = logp.exp_()  # the softmax, in place of the log-probabilities
            p.scatter_add_(1, t[:, None], torch.full_like(picked, -1.0)[:, None])
            p.mul_((k / count)[:, None])
            grad[i:i + rows] = p.to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None, None


def applies(h: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused path serves this loss: training (a gradient for h, none for the head) on the CPU
    with a bf16 or fp16 head, where it was measured (`bench/train.py --bf16`). fp32 keeps the plain path,
    whose results the tests pin bit for bit."""
    return (torch.is_grad_enabled() and h.requires_grad and not weight.requires_grad
            and h.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor,
                         count: torch.Tensor) -> torch.Tensor:
    """Sum over rows of cross_entropy(h @ weight.T, targets) / count, without the whole logits.
    h: (N, d); weight: (V, d), frozen; targets: (N,) valid ids; keep: (N,) bool, False for rows that do not
    count (core.model.loss.IGNORE targets); count: the mean's denominator (a tensor, so no host sync)."""
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(h, weight, targets, keep, count.to(torch.float32), rows)
