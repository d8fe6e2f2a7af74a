"""The LoRA variant seam (PEFT's LoraVariant): each kind of adapter is an object that owns how it starts,
what it adds to a forward, its weight update, its merged weight and the tensors it saves. LoRALinear
(core.lora.layers) holds the tensors and asks the adapter's variant; nothing outside this module asks
which variant an adapter is, only what it can do (`low_rank`, `needs_base_weight`, `label`).

- Lora: plain LoRA, s B A, A and B starting as PEFT's kaiming (True) or gaussian init, B = 0.
- Residual: PiSSA and OLoRA start A and B from the base weight's principal directions. PEFT then subtracts
  s B0 A0 from the base; here the base is never written: the layer keeps the frozen start (A0, B0) and the
  update is s (B A - B0 A0). Why: the base is shared by every user of the process (co-batched training,
  hot-swapped adapters, Compare), so a modified residual would change their outputs; the frozen pair is a
  private copy of just the part that moved. It is also exactly the rank-2r plain LoRA that PEFT writes
  when it converts such an adapter ([A; A0], [B, -B0]), so files stay portable.
- Dora: weight-decomposed LoRA, a trained magnitude m per output feature: the adapted weight is
  m * (W + s B A) / ||W + s B A||, the norm per output row in PEFT's (out, in) orientation and detached
  (the paper's section 4.3, as PEFT does).

Orientation: GPT-2's Conv1D stores W as (in, out) and computes x @ W + b; B A is (out, in).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.device import sums_in_fp32_while_generating
from core.lora import keys

# Initialisations that move part of the base weight into the adapter (PEFT: the base keeps the residual)
RESIDUAL_INITS = ("pissa", "olora")
INITS = ("kaiming", "gaussian") + RESIDUAL_INITS


class Lora:
    """Plain LoRA: the update s B A; A (r, in) and B (out, r) are trained."""
    label = "LoRA"
    # its update is x A^T B^T s: rows of several such adapters share one batched product (Route), a weighted
    # sum of such updates is itself one LoRA (blends), and llama.cpp's --lora applies it
    low_rank = True
    needs_base_weight = False  # its start and its update read only A and B
    parts = (keys.A, keys.B)  # the tensors it saves per wrapped projection

    def __init__(self, init: str = "kaiming"):
        self.init = init

    @property
    def what(self) -> str:
        """The variant as messages name it."""
        return f"{self.init} initialisation"

    def start(self, layer, name: str, r: int, generator=None) -> None:
        """A new adapter on `layer`: A and B as `self.init` draws them (every variant starts as the base)."""
        A, B = _zeros(layer, r)
        if self.init == "kaiming":  # PEFT's default: kaiming-uniform A (a=sqrt 5), zero B
            bound = 1.0 / math.sqrt(layer.in_features)
            A.uniform_(-bound, bound, generator=generator)
        elif self.init == "gaussian":  # PEFT: nn.init.normal_(lora_A, std=1 / r)
            A.normal_(0.0, 1.0 / r, generator=generator)
        layer.set_pair(name, A, B)

    def load(self, layer, name: str, tensors: dict) -> None:
        """Adapter `name` from saved tensors {part: tensor} (validated: core.adapters.validate)."""
        layer.set_pair(name, tensors[keys.A].float(), tensors[keys.B].float())

    def weights(self, layer, name: str):
        """(A, B) of the update s B A."""
        return layer.trainable(name)

    def update(self, layer, name: str, x, y=None):
        """What the adapter adds to the base output for rows `x` (after dropout); `y`, the base output for
        the same x, is not needed here. Computed in the activations' dtype from fp32 parameters."""
        A, B = self.weights(layer, name)
        return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * layer.scaling[name]

    def plus(self, layer, name: str, x, y):
        """y + the update for an adapter that has every row; summed in fp32 where the mixed batch sums its
        low-rank rows in fp32 (`sums_in_fp32_while_generating`), so a row alone equals it in a mix."""
        if sums_in_fp32_while_generating(x):
            return (y.float() + layer.lora(x.float(), name)).to(y.dtype)
        return y + layer.lora(x, name, y=y)

    def delta(self, layer, name: str) -> torch.Tensor:
        """The weight update (out, in) in fp32, PEFT's orientation (the base is (in, out))."""
        A, B = self.weights(layer, name)
        return (B.float() @ A.float()) * layer.scaling[name]

    @torch.no_grad()
    def merged_weight(self, layer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """`base_weight` (in, out) with the adapter folded in, fp32 on base_weight's device."""
        return base_weight.float() + self.delta(layer, name).to(base_weight.device).t()

    def trained(self, layer, name: str) -> tuple[list, list]:
        """(A-like, B-like) trained parameters: LoRA+ gives the second group its higher learning rate."""
        A, B = layer.trainable(name)
        return [A], [B]

    def state(self, layer, name: str) -> dict[str, torch.Tensor]:
        """{part: tensor} as saved (keys.key names each part)."""
        A, B = self.weights(layer, name)
        return {keys.A: A.detach(), keys.B: B.detach()}

    def remove(self, layer, name: str) -> None:
        """Drop what the variant keeps beside A and B."""

    def saved_config(self, lcfg):
        """The LoraConfig its saved file holds (adapter_config.json)."""
        return lcfg

    def extra_params(self, out_features: int) -> int:
        """Trained numbers beside A and B, per wrapped projection of `out_features`."""
        return 0


class Residual(Lora):
    """PiSSA / OLoRA: A and B start from the base weight's SVD / QR; the frozen start is subtracted."""
    needs_base_weight = True  # the start is computed from the base weight

    def start(self, layer, name: str, r: int, generator=None) -> None:
        scale = layer.scaling[name]
        if layer.device.type == "meta":  # shape-only models (size estimates)
            A, B = _zeros(layer, r)
        else:
            A, B = _principal(_base_weight(layer, self.what), r, scale, self.init)
        layer.set_pair(name, A, B)
        layer.frozen[name] = (A.clone(), B.clone())

    def weights(self, layer, name: str):
        """The rank-2r pair [A; A0], [B, -B0]: s (B A - B0 A0)."""
        A, B = layer.trainable(name)
        A0, B0 = layer.frozen[name]
        return torch.cat([A, A0.to(A.device)]), torch.cat([B, -B0.to(B.device)], 1)

    def remove(self, layer, name: str) -> None:
        layer.frozen.pop(name, None)

    def saved_config(self, lcfg):
        """A plain LoRA of twice the rank relative to the ORIGINAL base, as PEFT's save_pretrained(...,
        path_initial_model_for_weight_conversion=...) writes it. The scale stays alpha/r per layer: doubling
        r doubles alpha (rsLoRA: x sqrt 2)."""
        k = math.sqrt(2) if lcfg.use_rslora else 2.0
        return replace(lcfg, r=2 * lcfg.r, alpha=lcfg.alpha * k, init="kaiming",
                       rank_pattern={p: 2 * v for p, v in lcfg.rank_pattern.items()},
                       alpha_pattern={p: v * k for p, v in lcfg.alpha_pattern.items()})


class Dora(Lora):
    """DoRA: a trained magnitude m (out,) per wrapped projection on top of s B A."""
    label = what = "DoRA"
    low_rank = False  # each update is rescaled by its own weight norm: not a low-rank product
    needs_base_weight = True  # the norm reads the full-precision base weight
    parts = (keys.A, keys.B, keys.MAGNITUDE)

    def start(self, layer, name: str, r: int, generator=None) -> None:
        super().start(layer, name, r, generator)
        A, B = self.weights(layer, name)
        # PEFT's init: m = ||W + s B A||, so a fresh DoRA adapter (B = 0) is exactly the base
        W = _base_weight(layer, self.what).float()
        self._set_magnitude(layer, name, _weight_norm(W, A.float(), B.float(), layer.scaling[name]).clone())

    def load(self, layer, name: str, tensors: dict) -> None:
        _base_weight(layer, self.what)
        super().load(layer, name, tensors)
        self._set_magnitude(layer, name, tensors[keys.MAGNITUDE].float())

    @staticmethod
    def _set_magnitude(layer, name: str, m: torch.Tensor) -> None:
        # named lora_* so freeze_base keeps it trainable
        layer.lora_magnitude_vector[layer.keys[name]] = nn.Parameter(m.detach().to(layer.device, torch.float32).clone())

    @staticmethod
    def magnitude(layer, name: str) -> nn.Parameter:
        return layer.lora_magnitude_vector[layer.keys[name]]

    def update(self, layer, name: str, x, y=None):
        """(m/n - 1) * (x W) + (m/n) * s * B A x. `y` is the base output for this same x when the caller has
        it (no dropout drawn), else None and x W is recomputed from the dropped-out x, as PEFT does."""
        A, B = self.weights(layer, name)
        W, s = layer.base.weight, layer.scaling[name]
        n = _weight_norm(W, A.detach(), B.detach(), s)
        scale = (self.magnitude(layer, name) / n).to(x.dtype)  # (out,)
        base_out = x @ W.to(x.dtype) if y is None else y - layer.base.bias.to(y.dtype)  # x W, no bias
        lora = F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * s
        # in one product: autograd keeps one (.., out) tensor for m's gradient, not two
        return scale * (base_out + lora) - base_out

    def plus(self, layer, name: str, x, y):
        return y + layer.lora(x, name, y=y)  # as a mixed batch adds its DoRA rows (Route.own_rows)

    @torch.no_grad()
    def merged_weight(self, layer, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """m/n * (W + s B A), per output feature, in fp32 (in, out)."""
        dev = base_weight.device
        w = base_weight.float().t() + self.delta(layer, name).to(dev)  # (out, in)
        n = torch.linalg.norm(w, dim=1)
        return ((self.magnitude(layer, name).to(dev).float() / n)[:, None] * w).t()

    def trained(self, layer, name: str) -> tuple[list, list]:
        a, b = super().trained(layer, name)
        return a, b + [self.magnitude(layer, name)]  # PEFT's create_loraplus_optimizer puts 1-D ones with B

    def state(self, layer, name: str) -> dict[str, torch.Tensor]:
        return {**super().state(layer, name), keys.MAGNITUDE: self.magnitude(layer, name).detach()}

    def remove(self, layer, name: str) -> None:
        del layer.lora_magnitude_vector[layer.keys[name]]

    def extra_params(self, out_features: int) -> int:
        return out_features


def of(lcfg) -> Lora:
    """The variant a LoraConfig trains (ValueError for settings no variant has)."""
    if lcfg.init not in INITS:
        raise ValueError(f"unknown LoRA initialisation {lcfg.init!r}; choose from {', '.join(INITS)}.")
    if lcfg.use_dora and lcfg.init in RESIDUAL_INITS:
        # they are saved converted to a rank-2r LoRA; that conversion is not built for DoRA
        raise ValueError(f"DoRA cannot start from {lcfg.init} initialisation; choose kaiming or gaussian, "
                         "or turn DoRA off.")
    if lcfg.use_dora:
        return Dora(lcfg.init)
    return Residual(lcfg.init) if lcfg.init in RESIDUAL_INITS else Lora(lcfg.init)


def of_parts(parts) -> Lora:
    """The variant whose saved tensors are `parts` (ValueError if none is)."""
    for v in (Lora(), Dora()):
        if set(parts) == set(v.parts):
            return v
    raise ValueError(f"no LoRA variant saves {', '.join(sorted(parts))}.")


def check_fits(model, lcfg) -> None:
    """Refuse settings whose variant reads base weights that a quantized base does not have, before anything
    is written."""
    variant = of(lcfg)
    if not variant.needs_base_weight:
        return
    for block in model.transformer.h:
        for target in lcfg.targets:
            parent, child = target.split(".")
            _base_weight(getattr(getattr(block, parent), child), variant.what)


def _base_weight(layer, what: str) -> torch.Tensor:
    """The full-precision base weight (in, out), or a ValueError saying to load the base unquantized."""
    base = getattr(layer, "base", layer)
    if not hasattr(base, "weight"):
        raise ValueError(f"{what} needs the full-precision base weights; load the base unquantized "
                         f"(or train plain LoRA with kaiming or gaussian initialisation on a quantized base).")
    return base.weight


def _zeros(layer, r: int):
    dev = layer.device
    return (torch.zeros(r, layer.in_features, device=dev, dtype=torch.float32),
            torch.zeros(layer.out_features, r, device=dev, dtype=torch.float32))


def _principal(W: torch.Tensor, r: int, scale: float, method: str):
    """PiSSA's / OLoRA's (A, B) from the base weight W (in, out)."""
    W = W.detach().float().t()  # (out, in): Conv1D stores (in, out)
    if method == "pissa":  # PEFT pissa_init: SVD of W (out, in), S divided by the scale
        V, S, Uh = torch.linalg.svd(W, full_matrices=False)
        Sr = S[:r] / scale
        A, B = torch.diag(Sr.sqrt()) @ Uh[:r], V[:, :r] @ torch.diag(Sr.sqrt())
    else:  # PEFT olora_init: QR; B = Q[:, :r], A = R[:r] (here of W as (out, in))
        Q, R = torch.linalg.qr(W)
        A, B = R[:r], Q[:, :r]
    return A.contiguous(), B.contiguous()


def _weight_norm(base_weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per output feature (out,), detached; base_weight is Conv1D's (in, out)."""
    with torch.no_grad():  # summed in W's own (in, out) layout, not over a transposed view (faster)
        w = torch.addmm(base_weight.to(A.dtype), A.t(), B.t(), alpha=scaling)  # (W + s B A)^T
        return torch.linalg.vector_norm(w, dim=0)
