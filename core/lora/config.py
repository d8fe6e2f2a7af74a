"""LoRA's settings: LoraConfig (rank, alpha, targets, the variants) and the target names users type."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from core.checks import real_number, true_or_false, whole_number
from core.lora import patterns, variants
from core.model.config import ATTN_QKV, TARGET_MODULES, GPTConfig

MAX_RANK = 256  # LoRA rank, trained or loaded
MAX_ALPHA = 1024  # LoRA alpha to train with: real runs use 1..2 x rank; alpha / r past ~1024 overflows a step
# alpha of a loaded adapter (after rsLoRA's alpha * sqrt(r)): real ones stay far below; 1e300 only overflows
MAX_LOADED_ALPHA = 10_000.0


@dataclass
class LoraConfig:
    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the LoRA input path while training
    targets: tuple[str, ...] = (ATTN_QKV,)  # which projections of each block get an adapter
    use_dora: bool = False  # DoRA: a trained magnitude per output feature on top of B A (core.lora.variants)
    use_rslora: bool = False  # rsLoRA: scale by alpha / sqrt(r) instead of alpha / r
    init: str = "kaiming"  # start of A and B: kaiming | gaussian | pissa | olora (core.lora.variants)
    loraplus_lr_ratio: float = 1.0  # LoRA+: B's learning rate is this times A's
    rank_pattern: dict = field(default_factory=dict)  # PEFT's per-module ranks: {module regex: rank}
    alpha_pattern: dict = field(default_factory=dict)  # PEFT's per-module alphas: {module regex: alpha}

    @property
    def scaling(self) -> float:
        return self.alpha / self.r ** 0.5 if self.use_rslora else self.alpha / self.r

    def validate(self, cfg: GPTConfig | None = None) -> None:
        """Raise ValueError with a message a user can act on."""
        whole_number("rank", self.r, 1, MAX_RANK)
        if cfg is not None and self.r > cfg.n_embd:
            raise ValueError(f"rank {self.r} is larger than the model width {cfg.n_embd}; choose a rank <= {cfg.n_embd}.")
        # alpha / r scales the update: past ~1024 a single step already overflows (1e300 trained to NaN)
        real_number("alpha", self.alpha, 0, MAX_ALPHA, "a positive number", above=True,
                    hint=f"; use at most {MAX_ALPHA} (2 x rank is a common choice)")
        real_number("dropout", self.dropout, 0, 1, "in [0, 1)", below=True)
        if isinstance(self.targets, str) or not isinstance(self.targets, (list, tuple)):
            raise ValueError(f"LoRA targets must be a list of module names from {', '.join(TARGET_MODULES)}.")
        if not self.targets:
            raise ValueError(f"choose at least one target module from {', '.join(TARGET_MODULES)}.")
        for t in self.targets:
            if t not in TARGET_MODULES:
                raise ValueError(f"unknown target module {t!r}; choose from {', '.join(TARGET_MODULES)}.")
        true_or_false("use_dora", self.use_dora)
        self._validate_variants(cfg)

    def _validate_variants(self, cfg: GPTConfig | None) -> None:
        true_or_false("use_rslora", self.use_rslora)
        variants.of(self)  # settings no variant has (an unknown init, DoRA from PiSSA) are a ValueError
        real_number("LoRA+ learning-rate ratio", self.loraplus_lr_ratio, 0, 1000, "a positive number up to 1000",
                    above=True, hint="; 16 is the LoRA+ paper's choice, 1 turns it off")
        top = MAX_RANK if cfg is None else min(MAX_RANK, cfg.n_embd)
        patterns.check_patterns(self, None if cfg is None else cfg.n_layer, top, MAX_ALPHA)

    @staticmethod
    def from_dict(d) -> "LoraConfig":
        """Settings read from a file (a checkpoint's studio.json): checked, so garbage is a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"LoRA settings must be a JSON object (got {type(d).__name__}).")
        known = {k: v for k, v in d.items() if k in LoraConfig.__dataclass_fields__}
        if isinstance(known.get("targets"), list):  # JSON has no tuples
            known["targets"] = tuple(known["targets"])
        cfg = LoraConfig(**known)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def normalize_targets(targets) -> tuple[str, ...]:
    """The one parser of target modules (a flag, a form, a PEFT file): a list of names, or one comma-separated
    text. Accept short names (c_attn, c_fc) or full ones (attn.c_attn); keep the canonical order. 'c_proj' is
    ambiguous in GPT-2: PEFT matches it by suffix, so it names both projections."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    out = []
    for t in targets:
        full = [m for m in TARGET_MODULES if t in (m, m.split(".", 1)[1])]
        if not full:
            raise ValueError(f"unknown target module {str(t)[:40]!r}; choose from {', '.join(TARGET_MODULES)} "
                             f"(or the short names c_attn, c_proj, c_fc).")
        out += full
    return tuple(t for t in TARGET_MODULES if t in out)
