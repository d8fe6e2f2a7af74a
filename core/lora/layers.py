"""LoRA with named adapters on one frozen GPT-2, and per-row adapter routing.

The base projection is wrapped, not subclassed: `LoRALinear.base` is the original layer and is never
written to. Every forward names its adapters (a route); a merged model is only ever built as a copy
(core.adapters.export.merged_state_dict), because the base is shared by every user of the process.
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.device import sums_in_fp32_while_generating
from core.lora import dora, variants
from core.lora.init import init_ab
from core.lora.config import LoraConfig
from core.model.config import GPTConfig, TARGET_MODULES, target_shapes

# The key of one LoRA matrix in a state dict, as this engine names it (the adapter file format adds
# PEFT's prefix in front: core.adapters.format)
TARGET_PATTERN = "|".join(re.escape(t) for t in TARGET_MODULES)
LORA_KEY = re.compile(rf"^transformer\.h\.(\d+)\.({TARGET_PATTERN})\.lora_([AB])\.weight$")


def lora_key(layer: int, target: str, ab: str) -> str:
    """'transformer.h.{layer}.{target}.lora_{A|B}.weight' (target: one of TARGET_MODULES)."""
    return f"transformer.h.{layer}.{target}.lora_{ab}.weight"


def _key(name: str) -> str:
    # ParameterDict keys may not contain '.', adapter names may.
    return "n" + name.encode().hex()


class Route:
    """Which adapter each row of a batch uses (None = the base model alone).

    Built once per generation call. Each LoRA layer gathers its rows' A and B (scaled, zero for
    base rows, zero-padded to one rank) once, then adds every row's update with two batched
    matmuls, however many adapters the batch mixes.
    """

    def __init__(self, names: Sequence[str | None]):
        self.names = tuple(names)
        self.groups = [n for n in dict.fromkeys(self.names) if n]
        self._plans: dict[int, tuple[LoRALinear, tuple | None]] = {}  # id(layer) -> (layer, plan)
        self._dora: dict[int, tuple[LoRALinear, list]] = {}  # id(layer) -> (layer, DoRA row groups)

    def plan(self, layer: "LoRALinear", dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A_rows (batch, in, r), B_rows (batch, r, out)) for `layer`, or None if no row uses it."""
        key = id(layer)
        if key not in self._plans:
            self._plans[key] = (layer, self._gather(layer, dtype))
        return self._plans[key][1]

    def refresh(self) -> None:
        """Re-gather the adapters' current weights into the same tensors (captured graphs stay valid)."""
        for layer, plan in self._plans.values():
            if plan is not None:
                A, B = self._gather(layer, plan[0].dtype)
                plan[0].copy_(A)
                plan[1].copy_(B)

    def dora_rows(self, layer: "LoRALinear") -> list[tuple[str, torch.Tensor]]:
        """(adapter, row indices) for each DoRA adapter of the batch on `layer`: its update depends on
        its own weight norm, so it is not a gathered low-rank product and runs per group instead."""
        key = id(layer)
        if key not in self._dora:
            self._dora[key] = (layer, [(n, torch.tensor([i for i, m in enumerate(self.names) if m == n],
                                                         device=layer.device))
                                        for n in self.groups if layer.is_dora(n)])
        return self._dora[key][1]

    def _gather(self, layer: "LoRALinear", dtype):
        present = [n for n in self.groups if layer.has(n) and not layer.is_dora(n)]
        if not present:
            return None
        r = max(layer.weights(n)[0].shape[0] for n in present)
        A = torch.zeros(len(self.names), r, layer.in_features, device=layer.device)
        B = torch.zeros(len(self.names), layer.out_features, r, device=layer.device)
        for i, n in enumerate(self.names):
            if n in present:
                a, b = layer.weights(n)
                A[i, : a.shape[0]] = a.detach()
                B[i, :, : b.shape[1]] = b.detach() * layer.scaling[n]
        return A.transpose(1, 2).to(dtype), B.transpose(1, 2).to(dtype)


class Segment(NamedTuple):
    """Rows [start, stop) of a co-batched training step: one job's micro-batch."""
    name: str  # the job's adapter
    start: int
    stop: int
    length: int  # the job's own sequence length; positions past it are padding the adapter never sees
    generator: torch.Generator | None = None  # the job's own dropout RNG (None: no dropout)


class Segments:
    """Training route: contiguous row ranges, each trained through its own adapter (with gradients,
    unlike Route, which gathers detached weights for generation). A job's rows see only their own
    adapter, on their own positions, with their own dropout draws, so its gradient is the one a solo
    step computes."""

    def __init__(self, segments: Sequence[Segment]):
        self.segments = tuple(segments)


class LoRALinear(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()  # (r, in) per adapter
        self.lora_B = nn.ParameterDict()  # (out, r) per adapter
        # DoRA's magnitude (out,) per DoRA adapter (core.lora.dora); named so freeze_base keeps it trainable
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.keys: dict[str, str] = {}  # adapter name -> ParameterDict key
        self.frozen: dict[str, tuple] = {}  # PiSSA/OLoRA: name -> (A0, B0), the start subtracted (core.lora.init)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def has(self, name: str) -> bool:
        return name in self.scaling

    @property
    def device(self):
        return self.base.bias.device  # plain and quantized bases both keep a bias

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, generator=None, init: bool = True,
            method: str = "kaiming", rslora: bool = False):
        """A new adapter; init=False leaves A zero for weights about to be copied in (no RNG draw).
        method: how A and B start (core.lora.init); every one starts as exactly the base model."""
        scale = variants.scaling(alpha, r, rslora)
        frozen = None
        if init:
            A, B, frozen = init_ab(self.base, r, scale, method, generator)
        else:
            A = torch.zeros(r, self.in_features, device=self.device, dtype=torch.float32)
            B = torch.zeros(self.out_features, r, device=self.device, dtype=torch.float32)
        self.keys[name] = _key(name)
        self.lora_A[self.keys[name]] = nn.Parameter(A)
        self.lora_B[self.keys[name]] = nn.Parameter(B)
        if frozen is not None:
            self.frozen[name] = frozen
        self.scaling[name] = scale
        self.dropout[name] = dropout

    def enable_dora(self, name: str, magnitude: torch.Tensor | None = None):
        """Make adapter `name` a DoRA adapter: its magnitude is `magnitude` or PEFT's init from A, B, W."""
        if not hasattr(self.base, "weight"):
            raise RuntimeError("DoRA needs the base weights to compute its norm; load the base unquantized to use DoRA")
        A, B = self.weights(name)
        m = dora.initial_magnitude(self.base.weight, A, B, self.scaling[name]) if magnitude is None else magnitude
        self.lora_magnitude_vector[self.keys[name]] = nn.Parameter(
            m.detach().to(self.device, torch.float32).clone())

    def is_dora(self, name: str) -> bool:
        return name in self.keys and self.keys[name] in self.lora_magnitude_vector

    def remove(self, name: str):
        key = self.keys.pop(name)
        del self.lora_A[key], self.lora_B[key]
        if key in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[key]
        self.scaling.pop(name), self.dropout.pop(name), self.frozen.pop(name, None)

    def weights(self, name: str):
        """(A, B) of the update; for PiSSA/OLoRA the rank-2r pair [A; A0], [B, -B0] (see core.lora.init)."""
        key = self.keys[name]  # a plain dict lookup: torch.compile traces it without a graph break
        A, B = self.lora_A[key], self.lora_B[key]
        if name in self.frozen:
            A0, B0 = self.frozen[name]
            return torch.cat([A, A0.to(A.device)]), torch.cat([B, -B0.to(B.device)], 1)
        return A, B

    def trainable(self, name: str):
        """The adapter's own parameters (A, B): what an optimizer updates."""
        key = self.keys[name]
        return self.lora_A[key], self.lora_B[key]

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update (out, in) in fp32, PEFT's orientation (the base is (in, out))."""
        A, B = self.weights(name)
        return (B.float() @ A.float()) * self.scaling[name]

    def lora(self, x, name: str, generator: torch.Generator | None = None, y=None):
        """The adapter's addition to the base output; `y` (the base output for this x) saves DoRA a
        matmul when no dropout is drawn."""
        A, B = self.weights(name)
        p = self.dropout[name]
        x0 = x
        if p and torch.is_grad_enabled():  # never while generating or evaluating
            if generator is not None:
                # a training run's own RNG (core.train: every run passes one): its masks do not depend on
                # who else trains in the same step, and no module-wide train() flag is shared between runs
                x = x * torch.empty_like(x).bernoulli_(1 - p, generator=generator) / (1 - p)
            elif self.training:
                x = F.dropout(x, p)
        if self.is_dora(name):  # PEFT: the base part is recomputed from the dropped-out input
            base_out = y - self.base.bias.to(y.dtype) if (y is not None and x is x0) else None  # x W, no bias
            return dora.update(x, base_out, self.base.weight, A, B,
                               self.lora_magnitude_vector[self.keys[name]], self.scaling[name])
        # fp32 parameters, computed in the activations' dtype (bf16 on CUDA).
        return F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)) * self.scaling[name]

    def forward(self, x, route=None):
        """route: None (the base alone), an adapter's name (every row), Segments (training) or Route."""
        y = self.base(x)
        if route is None:
            return y
        if isinstance(route, str):
            return self._plus(y, x, route) if self.has(route) else y
        if isinstance(route, Segments):
            return self._segments(x, y, route)
        wide = sums_in_fp32_while_generating(x)
        plan = route.plan(self, torch.float32 if wide else x.dtype)
        out = y
        if plan is not None:  # some row's plain LoRA adapter wraps this projection
            A_rows, B_rows = plan  # (batch, in, r), (batch, r, out)
            if wide:
                out = torch.baddbmm(y.float(), torch.bmm(x.float(), A_rows), B_rows).to(y.dtype)
            else:
                out = torch.baddbmm(y, torch.bmm(x, A_rows), B_rows)
        for name, rows in route.dora_rows(self):
            out = out.index_add(0, rows, self.lora(x[rows], name, y=y[rows]).to(y.dtype))
        return out

    def _plus(self, y, x, name: str):
        """y + adapter `name`'s update; summed in fp32 where `sums_in_fp32_while_generating` says, as a mixed
        batch's rows are."""
        if sums_in_fp32_while_generating(x) and not self.is_dora(name):
            return (y.float() + self.lora(x.float(), name)).to(y.dtype)
        return y + self.lora(x, name, y=y)

    def _segments(self, x, y, route: Segments):
        """Each job's rows plus its own adapter's update (zero where the job has none on this layer)."""
        T, parts, used = x.shape[1], [], False
        for seg in route.segments:
            rows = x[seg.start:seg.stop, :seg.length]
            if self.has(seg.name):
                d, used = self.lora(rows, seg.name, seg.generator, y=y[seg.start:seg.stop, :seg.length]), True
            else:
                d = rows.new_zeros(rows.shape[:-1] + (self.out_features,))
            parts.append(F.pad(d, (0, 0, 0, T - seg.length)) if seg.length < T else d)
        return y + torch.cat(parts).to(y.dtype) if used else y

    @torch.no_grad()
    def merged_weight(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """`base_weight` (in, out) with adapter `name` folded in, fp32 on base_weight's device."""
        if self.is_dora(name):
            A, B = self.weights(name)
            dev = base_weight.device
            return dora.merged_weight(base_weight, A.to(dev), B.to(dev),
                                      self.lora_magnitude_vector[self.keys[name]].to(dev), self.scaling[name])
        return base_weight.float() + self.delta(name).to(base_weight.device).t()

# ---- model-level helpers -------------------------------------------------------------

def lora_layers(model) -> dict[str, LoRALinear]:
    """'transformer.h.{i}.attn.c_attn' -> wrapper, for every wrapped projection."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _wrap(model, target: str) -> list[LoRALinear]:
    out = []
    for block in model.transformer.h:
        parent_name, child = target.split(".")
        parent = getattr(block, parent_name)
        layer = getattr(parent, child)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            setattr(parent, child, layer)
        out.append(layer)
    return out


def _bump(model) -> None:
    """Adapters were added or removed: cached decode graphs must not be reused."""
    model.lora_version = getattr(model, "lora_version", 0) + 1


def freeze_base(model) -> None:
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            p.requires_grad_(False)


def adapter_names(model) -> list[str]:
    names = []
    for layer in lora_layers(model).values():
        for n in layer.scaling:
            if n not in names:
                names.append(n)
    return names


def add_adapter(model, name: str, lcfg: LoraConfig, seed: int | None = None) -> None:
    """A fresh adapter (B = 0, so it starts as the identity) on the configured targets."""
    lcfg.validate(model.config)
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already loaded")
    g = None
    if model.device.type != "meta":  # shape-only models (size estimates) need no random init
        g = torch.Generator(device=model.device)
        g.manual_seed(0 if seed is None else seed)
    for target in lcfg.targets:
        for i, layer in enumerate(_wrap(model, target)):
            r, alpha = variants.rank_alpha(lcfg, f"transformer.h.{i}.{target}")
            layer.add(name, r, alpha, lcfg.dropout, generator=g, method=lcfg.init, rslora=lcfg.use_rslora)
            if lcfg.use_dora:
                layer.enable_dora(name)
    freeze_base(model)
    _bump(model)


def remove_adapter(model, name: str) -> None:
    found = False
    for layer in lora_layers(model).values():
        if layer.has(name):
            layer.remove(name)
            found = True
    if not found:
        raise KeyError(f"no adapter named {name!r} is loaded")
    _bump(model)


def make_route(model, names: Sequence[str | None]) -> Route | str | None:
    """Per-row routing for a forward: `names[i]` is row i's adapter or None for the base (None: every
    row's is the base)."""
    loaded = set(adapter_names(model))
    for n in names:
        if n and n not in loaded:
            raise KeyError(f"no adapter named {n!r} is loaded")
    if len(set(names)) == 1:
        return names[0] or None
    return Route(names)


def lora_parameters(model, name: str) -> list[nn.Parameter]:
    params = []
    for layer in lora_layers(model).values():
        if layer.has(name):
            params += list(layer.trainable(name))
            if layer.is_dora(name):
                params.append(layer.lora_magnitude_vector[layer.keys[name]])
    return params


def lora_param_groups(model, name: str, lr: float, loraplus_lr_ratio: float = 1.0) -> list[dict]:
    """Optimizer groups: the A matrices at `lr`, the B matrices at ratio x lr (LoRA+; ratio 1 is plain
    LoRA). 'lr_ratio' stays in each group so a schedule can set lr = schedule x lr_ratio. DoRA's
    magnitudes join B's group, as PEFT's create_loraplus_optimizer puts every 1-D parameter there."""
    layers = [l for l in lora_layers(model).values() if l.has(name)]
    A = [l.trainable(name)[0] for l in layers]
    B = [l.trainable(name)[1] for l in layers]
    B += [l.lora_magnitude_vector[l.keys[name]] for l in layers if l.is_dora(name)]
    return [{"params": A, "lr": lr, "lr_ratio": 1.0},
            {"params": B, "lr": lr * loraplus_lr_ratio, "lr_ratio": float(loraplus_lr_ratio)}]


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """PEFT-style keys without the 'base_model.model.' prefix: '...c_attn.lora_A.weight'."""
    out = {}
    for path, layer in lora_layers(model).items():
        if layer.has(name):
            A, B = layer.weights(name)
            i, target = _block_and_target(path)
            out[lora_key(i, target, "A")] = A.detach()
            out[lora_key(i, target, "B")] = B.detach()
            if layer.is_dora(name):
                out[dora.magnitude_key(i, target)] = layer.lora_magnitude_vector[layer.keys[name]].detach()
    if not out:
        raise KeyError(f"no adapter named {name!r} is loaded")
    return out


def load_adapter_state(model, name: str, state: dict[str, torch.Tensor], alpha: float,
                       dropout: float = 0.0, lcfg: LoraConfig | None = None) -> None:
    """Load validated LoRA tensors (keys as `adapter_state_dict` writes them) as adapter `name`.
    lcfg, when given, sets each layer's alpha (alpha_pattern) and rsLoRA; the rank is the tensors'."""
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already loaded")
    targets: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, t in state.items():
        m = LORA_KEY.match(k) or dora.MAGNITUDE_KEY.match(k)
        if not m:
            raise ValueError(f"unexpected adapter key {k!r}")
        part = m.group(3) if m.re is LORA_KEY else "m"
        targets.setdefault((int(m.group(1)), m.group(2)), {})[part] = t
    with_m = {slot for slot, ab in targets.items() if "m" in ab}
    for (i, target), ab in targets.items():
        if set(ab) - {"m"} != {"A", "B"}:
            raise ValueError(f"layer {i} {target}: lora_A and lora_B must both be present")
        if with_m and (i, target) not in with_m:
            raise ValueError(f"layer {i} {target}: a DoRA adapter needs a lora_magnitude_vector on every target")
    for target in {t for _, t in targets}:
        _wrap(model, target)
    layers = lora_layers(model)
    for (i, target), ab in targets.items():
        layer = layers[f"transformer.h.{i}.{target}"]
        r = ab["A"].shape[0]
        a = variants.rank_alpha(lcfg, f"transformer.h.{i}.{target}")[1] if lcfg else alpha
        layer.add(name, r, a, dropout, init=False, rslora=bool(lcfg and lcfg.use_rslora))
        A, B = layer.weights(name)
        with torch.no_grad():
            A.copy_(ab["A"].float())
            B.copy_(ab["B"].float())
        if "m" in ab:
            layer.enable_dora(name, ab["m"].float())
    freeze_base(model)
    _bump(model)


def count_lora_params(cfg: GPTConfig, r: int, targets: Iterable[str], lcfg: LoraConfig | None = None,
                      dora: bool = False) -> int:
    """Trainable parameters of a rank-r adapter on `targets` in every block (lcfg: with its per-layer
    ranks and its DoRA flag; DoRA adds a magnitude per output feature)."""
    shapes = target_shapes(cfg)
    dora = dora or (lcfg is not None and lcfg.use_dora)
    magnitudes = cfg.n_layer * sum(shapes[t][1] for t in targets) if dora else 0
    if lcfg is not None:
        return variants.param_count(lcfg, shapes, cfg.n_layer) + magnitudes
    return cfg.n_layer * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets) + magnitudes



def _block_and_target(path: str) -> tuple[int, str]:
    """'transformer.h.3.attn.c_attn' -> (3, 'attn.c_attn')."""
    _, _, i, target = path.split(".", 3)
    return int(i), target
