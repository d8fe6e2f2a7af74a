"""DoRA (weight-decomposed LoRA): the LoRA variant that owns its magnitude vector.

A DoRA adapter keeps A, B and scaling s as plain LoRA does, plus a magnitude m (one value per output
feature). The adapted weight is m * (W + s B A) / ||W + s B A||, the norm taken per output row in
PEFT's (out, in) orientation, i.e. over the input features. Following the paper (section 4.3) and
PEFT, the norm is detached: it follows the update but passes no gradient. Everything DoRA-specific
lives here (its init, its update, its merged weight, its key), so LoRALinear only asks "is this
adapter DoRA?" and calls in.

Orientation: GPT-2's Conv1D stores W as (in, out) and computes x @ W + b; B A is (out, in).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from core.model.config import TARGET_MODULES

# The magnitude vector's key, as PEFT saves it (no '.weight' suffix: get_peft_model_state_dict strips it)
TARGET_PATTERN = "|".join(re.escape(t) for t in TARGET_MODULES)
MAGNITUDE_KEY = re.compile(rf"^transformer\.h\.(\d+)\.({TARGET_PATTERN})\.lora_magnitude_vector$")


def magnitude_key(layer: int, target: str) -> str:
    return f"transformer.h.{layer}.{target}.lora_magnitude_vector"


def weight_norm(base_weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per output feature (out,), detached; base_weight is Conv1D's (in, out)."""
    with torch.no_grad():  # summed in W's own (in, out) layout: 5x faster than over a transposed view
        w = torch.addmm(base_weight.to(A.dtype), A.t(), B.t(), alpha=scaling)  # (W + s B A)^T
        return torch.linalg.vector_norm(w, dim=0)


def initial_magnitude(base_weight, A, B, scaling) -> torch.Tensor:
    """PEFT's init: m = ||W + s B A||, so a fresh DoRA adapter (B = 0) is exactly the base."""
    return weight_norm(base_weight.float(), A.float(), B.float(), scaling).clone()


def update(x, base_out, base_weight, A, B, m, scaling) -> torch.Tensor:
    """What DoRA adds to the base output: (m/n - 1) * (x W) + (m/n) * s * B A x.

    `x` is the LoRA input after dropout; `base_out` is x W without bias when the caller has it for that
    same x (no dropout drawn), else None and it is recomputed from the dropped-out x, as PEFT does.
    """
    n = weight_norm(base_weight, A.detach(), B.detach(), scaling)
    scale = (m / n).to(x.dtype)  # (out,)
    if base_out is None:
        base_out = x @ base_weight.to(x.dtype)
    lora = F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * scaling
    # = (m/n - 1) x W + (m/n) s B A x, in one product: autograd keeps one (.., out) tensor for m's gradient, not two
    return scale * (base_out + lora) - base_out


def merged_weight(base_weight, A, B, m, scaling) -> torch.Tensor:
    """The merged Conv1D weight (in, out) in fp32: m/n * (W + s B A), per output feature."""
    w = base_weight.float().t() + (B.float() @ A.float()) * scaling  # (out, in)
    n = torch.linalg.norm(w, dim=1)
    return ((m.float() / n)[:, None] * w).t()
