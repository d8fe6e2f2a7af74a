"""LoRA with named adapters on one frozen GPT-2, and per-row adapter routing.

The base projection is wrapped, not subclassed: `LoRALinear.base` is the original layer and is never
written to. Every forward names its adapters (a route); a merged model is only ever built as a copy
(core.adapters.export.merged_state_dict), because the base is shared by every user of the process.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.device import sums_in_fp32_while_generating
from core.lora import keys, patterns, variants
from core.lora.config import LoraConfig
from core.model.config import GPTConfig, target_shapes


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
        self._own: dict[int, tuple[LoRALinear, list]] = {}  # id(layer) -> (layer, row groups of other variants)

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

    def own_rows(self, layer: "LoRALinear") -> list[tuple[str, torch.Tensor]]:
        """(adapter, row indices) for each adapter of the batch on `layer` whose variant is not low-rank
        (DoRA: its update depends on its own weight norm), so its rows run as a group of their own."""
        key = id(layer)
        if key not in self._own:
            self._own[key] = (layer, [(n, torch.tensor([i for i, m in enumerate(self.names) if m == n],
                                                       device=layer.device))
                                      for n in self.groups if layer.has(n) and not layer.variant[n].low_rank])
        return self._own[key][1]

    def _gather(self, layer: "LoRALinear", dtype):
        present = [n for n in self.groups if layer.has(n) and layer.variant[n].low_rank]
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
    """A projection with named adapters. It holds their tensors; each adapter's variant
    (core.lora.variants) decides how they start, what they add and what they save."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()  # (r, in) per adapter
        self.lora_B = nn.ParameterDict()  # (out, r) per adapter
        # DoRA's magnitude (out,) per DoRA adapter; named lora_* so freeze_base keeps it trainable
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.keys: dict[str, str] = {}  # adapter name -> ParameterDict key
        self.variant: dict[str, variants.Lora] = {}  # adapter name -> its variant
        self.frozen: dict[str, tuple] = {}  # PiSSA/OLoRA: name -> (A0, B0), the start subtracted

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

    def add(self, name: str, r: int, scaling: float, dropout: float, variant: variants.Lora,
            generator=None, tensors: dict | None = None):
        """A new adapter: started by `variant` (every one starts as exactly the base model), or loaded
        from saved `tensors` ({part: tensor}, core.lora.keys)."""
        self.keys[name], self.scaling[name] = _key(name), scaling
        try:
            if tensors is None:
                variant.start(self, name, r, generator)
            else:
                variant.load(self, name, tensors)
        except BaseException:  # e.g. DoRA on a quantized base: nothing of the adapter stays behind
            key = self.keys.pop(name)
            self.scaling.pop(name)
            for d in (self.lora_A, self.lora_B):
                if key in d:
                    del d[key]
            raise
        self.dropout[name], self.variant[name] = dropout, variant

    def set_pair(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Store A (r, in) and B (out, r) as adapter `name`'s trained parameters (fp32 copies)."""
        self.lora_A[self.keys[name]] = nn.Parameter(A.to(self.device, torch.float32, copy=True))
        self.lora_B[self.keys[name]] = nn.Parameter(B.to(self.device, torch.float32, copy=True))

    def remove(self, name: str):
        self.variant.pop(name).remove(self, name)
        key = self.keys.pop(name)
        del self.lora_A[key], self.lora_B[key]
        self.scaling.pop(name), self.dropout.pop(name)

    def weights(self, name: str):
        """(A, B) of the update s B A, as the variant computes with them."""
        return self.variant[name].weights(self, name)

    def trainable(self, name: str):
        """The adapter's own A and B parameters (a plain dict lookup: torch.compile traces it)."""
        key = self.keys[name]
        return self.lora_A[key], self.lora_B[key]

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's low-rank weight update (out, in) in fp32, PEFT's orientation (the base is (in, out))."""
        return self.variant[name].delta(self, name)

    def lora(self, x, name: str, generator: torch.Generator | None = None, y=None):
        """The adapter's addition to the base output; `y` (the base output for this x) is passed on to the
        variant only when no dropout is drawn (it is then the base output of the very x it sees)."""
        p = self.dropout[name]
        if p and torch.is_grad_enabled():  # never while generating or evaluating
            if generator is not None:
                # a training run's own RNG (core.train: every run passes one): its masks do not depend on
                # who else trains in the same step, and no module-wide train() flag is shared between runs
                x, y = x * torch.empty_like(x).bernoulli_(1 - p, generator=generator) / (1 - p), None
            elif self.training:
                x, y = F.dropout(x, p), None
        return self.variant[name].update(self, name, x, y)

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
        for name, rows in route.own_rows(self):
            out = out.index_add(0, rows, self.lora(x[rows], name, y=y[rows]).to(y.dtype))
        return out

    def _plus(self, y, x, name: str):
        """y + adapter `name`'s update on every row, as its variant adds it."""
        return self.variant[name].plus(self, name, x, y)

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

    def merged_weight(self, name: str, base_weight: torch.Tensor) -> torch.Tensor:
        """`base_weight` (in, out) with adapter `name` folded in, fp32 on base_weight's device."""
        return self.variant[name].merged_weight(self, name, base_weight)


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
    """A fresh adapter (it starts as the identity) on the configured targets, of lcfg's variant."""
    lcfg.validate(model.config)
    variants.check_fits(model, lcfg)
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already loaded")
    g = None
    if model.device.type != "meta":  # shape-only models (size estimates) need no random init
        g = torch.Generator(device=model.device)
        g.manual_seed(0 if seed is None else seed)
    variant = variants.of(lcfg)
    for target in lcfg.targets:
        for i, layer in enumerate(_wrap(model, target)):
            r, alpha = patterns.rank_alpha(lcfg, keys.module(i, target))
            layer.add(name, r, patterns.scaling(alpha, r, lcfg.use_rslora), lcfg.dropout, variant, generator=g)
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
    """What an optimizer updates for adapter `name`, layer by layer (A, B, then the variant's own)."""
    params = []
    for layer in lora_layers(model).values():
        if layer.has(name):
            a, b = layer.variant[name].trained(layer, name)
            params += a + b
    return params


def lora_param_groups(model, name: str, lr: float, loraplus_lr_ratio: float = 1.0) -> list[dict]:
    """Optimizer groups: the A matrices at `lr`, the B matrices at ratio x lr (LoRA+; ratio 1 is plain
    LoRA). 'lr_ratio' stays in each group so a schedule can set lr = schedule x lr_ratio. Each variant says
    which of its parameters go with B (DoRA's magnitudes: PEFT's create_loraplus_optimizer puts every 1-D
    parameter there)."""
    A, B = [], []
    for layer in lora_layers(model).values():
        if layer.has(name):
            a, b = layer.variant[name].trained(layer, name)
            A += a
            B += b
    return [{"params": A, "lr": lr, "lr_ratio": 1.0},
            {"params": B, "lr": lr * loraplus_lr_ratio, "lr_ratio": float(loraplus_lr_ratio)}]


def adapter_state_dict(model, name: str) -> dict[str, torch.Tensor]:
    """Our keys (core.lora.keys: PEFT's without the 'base_model.model.' prefix) -> detached tensors."""
    out = {}
    for path, layer in lora_layers(model).items():
        if layer.has(name):
            i, target = _block_and_target(path)
            for part, t in layer.variant[name].state(layer, name).items():
                out[keys.key(i, target, part)] = t.detach()
    if not out:
        raise KeyError(f"no adapter named {name!r} is loaded")
    return out


def load_adapter_state(model, name: str, state: dict[str, torch.Tensor], alpha: float,
                       dropout: float = 0.0, lcfg: LoraConfig | None = None) -> None:
    """Load validated LoRA tensors (keys as `adapter_state_dict` writes them) as adapter `name`.
    lcfg, when given, sets each layer's alpha (alpha_pattern) and rsLoRA; the rank is the tensors'."""
    if name in adapter_names(model):
        raise ValueError(f"an adapter named {name!r} is already loaded")
    slots = {slot: {part: state[k] for part, k in found.items()} for slot, found in keys.modules(state).items()}
    kinds = {slot: variants.of_parts(parts) for slot, parts in slots.items()}
    labels = sorted({v.label for v in kinds.values()})
    if len(labels) > 1:  # e.g. a magnitude vector on some targets only
        raise ValueError(f"the adapter's modules are not all of one variant ({' and '.join(labels)}); a DoRA "
                         f"adapter has a lora_magnitude_vector on every target.")
    for target in {t for _, t in slots}:
        _wrap(model, target)
    layers = lora_layers(model)
    try:
        for (i, target), tensors in slots.items():
            r = tensors[keys.A].shape[0]
            a = patterns.rank_alpha(lcfg, keys.module(i, target))[1] if lcfg else alpha
            scale = patterns.scaling(a, r, bool(lcfg and lcfg.use_rslora))
            layers[keys.module(i, target)].add(name, r, scale, dropout, kinds[(i, target)], tensors=tensors)
    except BaseException:  # a layer refused it (a DoRA adapter on a quantized base): none keeps a part
        for layer in layers.values():
            if layer.has(name):
                layer.remove(name)
        raise
    freeze_base(model)
    _bump(model)


def count_lora_params(cfg: GPTConfig, r: int, targets: Iterable[str], lcfg: LoraConfig | None = None) -> int:
    """Trainable parameters of a rank-r adapter on `targets` in every block (lcfg: with its per-layer
    ranks and its variant's own parameters, such as DoRA's magnitude per output feature)."""
    shapes = target_shapes(cfg)
    variant = variants.of(lcfg) if lcfg is not None else variants.Lora()
    extra = cfg.n_layer * sum(variant.extra_params(shapes[t][1]) for t in targets)
    if lcfg is not None:
        return patterns.param_count(lcfg, shapes, cfg.n_layer) + extra
    return cfg.n_layer * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets) + extra


def _block_and_target(path: str) -> tuple[int, str]:
    """'transformer.h.3.attn.c_attn' -> (3, 'attn.c_attn')."""
    _, _, i, target = path.split(".", 3)
    return int(i), target
