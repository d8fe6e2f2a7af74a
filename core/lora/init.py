"""How a new adapter's A and B start (PEFT's init_lora_weights), per wrapped projection.

kaiming (PEFT's True) and gaussian start at B = 0, so the adapter is exactly the base. PiSSA and OLoRA
start from the base weight's principal directions; PEFT then subtracts scale * B0 @ A0 from the base.
Here the base is never written: the layer keeps the frozen start (A0, B0) and computes
scale * (B @ A - B0 @ A0), the same function. Why: the base is shared by every user of the process
(co-batched training, hot-swapped adapters, Compare), so a modified residual would change their outputs;
the frozen pair is a private copy of just the part that moved, r x (in + out) numbers. It is also exactly
the rank-2r plain LoRA that PEFT writes when it converts such an adapter, so files stay portable.
"""
from __future__ import annotations

import math

import torch


def init_ab(base, r: int, scale: float, method: str, generator=None):
    """(A (r, in), B (out, r), frozen start (A0, B0) or None), fp32 on the base's device."""
    out_f, in_f = base.out_features, base.in_features
    dev = base.bias.device
    A = torch.zeros(r, in_f, device=dev, dtype=torch.float32)
    B = torch.zeros(out_f, r, device=dev, dtype=torch.float32)
    if method == "kaiming":  # PEFT's default: kaiming-uniform A (a=sqrt 5), zero B
        bound = 1.0 / math.sqrt(in_f)
        A.uniform_(-bound, bound, generator=generator)
        return A, B, None
    if method == "gaussian":  # PEFT: nn.init.normal_(lora_A, std=1 / r)
        A.normal_(0.0, 1.0 / r, generator=generator)
        return A, B, None
    if dev.type == "meta":  # shape-only models (size estimates)
        return A, B, (A.clone(), B.clone())
    if not hasattr(base, "weight"):
        raise ValueError(f"{method} initialisation needs the base weights; load the base unquantized.")
    W = base.weight.detach().float().t()  # (out, in): Conv1D stores (in, out)
    if method == "pissa":  # PEFT pissa_init: SVD of W (out, in), S divided by the scale
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        Sr = S[:r] / scale
        A = torch.diag(Sr.sqrt()) @ Uh[:r]
        B = V[:, :r] @ torch.diag(Sr.sqrt())
    elif method == "olora":  # PEFT olora_init: QR; B = Q[:, :r], A = R[:r] (here of W as (out, in))
        Q, R = torch.linalg.qr(W)
        A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    else:
        raise ValueError(f"unknown LoRA initialisation {method!r}; choose kaiming, gaussian, pissa or olora.")
    A, B = A.contiguous(), B.contiguous()
    return A, B, (A.clone(), B.clone())


def check_fits(model, lcfg) -> None:
    """PiSSA/OLoRA read the base weights: refuse a quantized base before anything is written."""
    from core.lora.variants import RESIDUAL_INITS
    if lcfg.init not in RESIDUAL_INITS:
        return
    for block in model.transformer.h:
        for target in lcfg.targets:
            parent, child = target.split(".")
            layer = getattr(getattr(block, parent), child)
            if not hasattr(getattr(layer, "base", layer), "weight"):
                raise ValueError(f"{lcfg.init} initialisation needs the base weights; load the base unquantized "
                                 f"(or use --init kaiming with a quantized base).")
