"""Configuration dataclasses: model shapes, LoRA settings, training settings."""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

# The four GPT-2 projections LoRA may wrap (HF module names inside each block), with their
# (in, out) features as multiples of the model width n_embd: c_attn makes q, k and v at once, and
# the MLP is 4x wider than the model. Every shape, count and width rule derives from this table.
TARGET_WIDTHS = {"attn.c_attn": (1, 3), "attn.c_proj": (1, 1), "mlp.c_fc": (1, 4), "mlp.c_proj": (4, 1)}
TARGET_MODULES = tuple(TARGET_WIDTHS)
EOT_TOKEN = 50256  # <|endoftext|>


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # model width
    vocab_size: int = 50257  # GPT-2 BPE vocabulary incl. <|endoftext|>
    block_size: int = 1024  # longest context (learned position embeddings)
    layer_norm_eps: float = 1e-5  # as in HF GPT2Config

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def n_params(self) -> int:
        """Parameters with the tied lm_head counted once (GPT-2 124M for the gpt2 preset)."""
        d, L = self.n_embd, self.n_layer
        # the four projections' weights and biases, and two layer norms (weight + bias each)
        per_block = sum(i * o * d * d + o * d for i, o in TARGET_WIDTHS.values()) + 4 * d
        return self.vocab_size * d + self.block_size * d + L * per_block + 2 * d

    def to_hf(self) -> dict:
        """The matching transformers GPT2Config as a dict (for config.json)."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
            "vocab_size": self.vocab_size, "n_positions": self.block_size, "n_ctx": self.block_size,
            "layer_norm_epsilon": self.layer_norm_eps, "activation_function": "gelu_new",
            "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": True,
        }

    @staticmethod
    def from_hf(cfg: dict) -> "GPTConfig":
        return GPTConfig(
            n_layer=int(cfg["n_layer"]), n_head=int(cfg["n_head"]), n_embd=int(cfg["n_embd"]),
            vocab_size=int(cfg.get("vocab_size", 50257)),
            block_size=int(cfg.get("n_positions", cfg.get("n_ctx", 1024))),
            layer_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        )


def target_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each target projection of `cfg`."""
    return {t: (i * cfg.n_embd, o * cfg.n_embd) for t, (i, o) in TARGET_WIDTHS.items()}


def width_from_a(target: str, a_shape) -> int:
    """Model width implied by a LoRA A matrix (r, in) of `target` (mlp.c_proj's A reads the 4x wider
    hidden layer)."""
    return a_shape[1] // TARGET_WIDTHS[target][0]


# Named model presets. "tiny" is random (fixed seed) so the app runs offline end to end.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(12, 12, 768),
    "gpt2-medium": GPTConfig(24, 16, 1024),
    "gpt2-large": GPTConfig(36, 20, 1280),
    "gpt2-xl": GPTConfig(48, 25, 1600),
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64),
}

# Hub repositories for the real presets.
HUB_IDS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


@dataclass
class LoraConfig:
    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the LoRA input path while training
    targets: tuple[str, ...] = ("attn.c_attn",)  # which projections of each block get an adapter
    use_dora: bool = False  # DoRA: a trained magnitude per output feature on top of B A (core.lora.dora)
    use_rslora: bool = False  # rsLoRA: scale by alpha / sqrt(r) instead of alpha / r
    init: str = "kaiming"  # start of A and B: kaiming | gaussian | pissa | olora (core.lora.init)
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
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be true or false (got {self.use_dora!r}).")
        self._validate_variants(cfg)

    def _validate_variants(self, cfg: GPTConfig | None) -> None:
        from core.lora import variants  # the pattern rules live with the LoRA code
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be true or false (got {self.use_rslora!r}).")
        if self.init not in variants.INITS:
            raise ValueError(f"unknown LoRA initialisation {self.init!r}; choose from {', '.join(variants.INITS)}.")
        real_number("LoRA+ learning-rate ratio", self.loraplus_lr_ratio, 0, 1000, "a positive number up to 1000",
                    above=True, hint="; 16 is the LoRA+ paper's choice, 1 turns it off")
        top = MAX_RANK if cfg is None else min(MAX_RANK, cfg.n_embd)
        variants.check_patterns(self, None if cfg is None else cfg.n_layer, top, MAX_ALPHA)
        if self.use_dora and self.init in ("pissa", "olora"):
            # they are saved converted to a rank-2r LoRA (core.lora.init); that conversion is not built for DoRA
            raise ValueError(f"DoRA cannot start from {self.init} initialisation; choose kaiming or gaussian, "
                             "or turn DoRA off.")

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
    """Accept short names (c_attn, c_fc) or full ones (attn.c_attn); keep the canonical order."""
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    short = {"c_attn": "attn.c_attn", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj",
             "attn.c_proj": "attn.c_proj", "attn.c_attn": "attn.c_attn", "mlp.c_fc": "mlp.c_fc"}
    out = []
    for t in targets:
        if t == "c_proj":  # ambiguous in GPT-2: PEFT matches both projections by suffix
            out += ["attn.c_proj", "mlp.c_proj"]
        elif t in short:
            out.append(short[t])
        else:
            raise ValueError(f"unknown target module {t!r}; choose from {', '.join(TARGET_MODULES)}.")
    return tuple(t for t in TARGET_MODULES if t in out)


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps to run
    lr: float = 3e-4  # peak learning rate (AdamW)
    warmup_steps: int | None = None  # linear warmup from 0 to lr; None = 10% of steps (at most 50)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    batch_size: int = 4  # sequences per micro-batch
    seq_len: int = 128  # tokens per sequence (reduced to fit when the training text is shorter)
    grad_accum: int = 4  # micro-batches per optimizer step (batch_size * grad_accum sequences per step)
    grad_clip: float = 1.0  # clip the gradient norm to this (0 = off)
    weight_decay: float = 0.01  # AdamW weight decay on the LoRA weights
    eval_interval: int = 50  # validation loss every this many steps (0 = only at the start and end)
    eval_max_batches: int = 20  # cap on validation micro-batches; a larger split is sampled evenly
    checkpoint_interval: int = 50  # checkpoint every this many steps (0 = only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept per run (0 = keep all)
    sample_prompts: tuple[str, ...] = ()  # prompts continued at each evaluation (empty = no samples)
    sample_tokens: int = 40  # new tokens per sample generation
    seed: int = 1337  # adapter init and batch order; same seed + same data = same run
    cuda_graphs: bool = True  # on GPUs, replay each micro-step as a CUDA graph (7x faster at 4 x 128)

    def warmup(self) -> int:
        """Warmup length in steps (the default is 10% of the run, at most 50)."""
        return min(50, self.steps // 10) if self.warmup_steps is None else self.warmup_steps

    def validate(self, cfg: GPTConfig | None = None) -> None:
        """Raise ValueError with a message a user can act on."""
        whole_number("steps", self.steps, 1, 1_000_000)
        real_number("learning rate", self.lr, 0, 1, "a number > 0 and <= 1, e.g. 3e-4", above=True)
        if self.warmup_steps is not None:
            whole_number("warmup steps", self.warmup_steps, 0, self.steps)
        real_number("min lr ratio", self.min_lr_ratio, 0, 1, "in [0, 1]")
        whole_number("batch size", self.batch_size, 1, 4096)
        whole_number("sequence length", self.seq_len, 1, 1024)
        if cfg is not None and self.seq_len > cfg.block_size:
            raise ValueError(f"sequence length {self.seq_len} exceeds the model's context of "
                             f"{cfg.block_size} tokens; choose a sequence length <= {cfg.block_size}.")
        whole_number("gradient accumulation steps", self.grad_accum, 1, 4096)
        real_number("gradient clip", self.grad_clip, 0, 1000, "a number from 0 to 1000, 0 turns it off")
        real_number("weight decay", self.weight_decay, 0, 10, "a number from 0 to 10")
        whole_number("eval interval", self.eval_interval, 0, 1_000_000)
        whole_number("eval max batches", self.eval_max_batches, 1, 10_000)
        whole_number("checkpoint interval", self.checkpoint_interval, 0, 1_000_000)
        whole_number("checkpoints to keep", self.keep_checkpoints, 0, 1000)
        whole_number("sample tokens", self.sample_tokens, 1, 1024)
        check_prompts(self.sample_prompts)
        whole_number("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda graphs must be true or false (got {self.cuda_graphs!r}).")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sample_prompts"] = list(self.sample_prompts)
        return d

    @staticmethod
    def from_dict(d) -> "TrainConfig":
        """Settings read from a file (a checkpoint's studio.json): checked, so garbage is a ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"training settings must be a JSON object (got {type(d).__name__}).")
        known = {k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__}
        if "sample_prompts" in known:
            if not isinstance(known["sample_prompts"], (list, tuple)):
                raise ValueError("sample prompts must be a list of texts.")
            known["sample_prompts"] = tuple(known["sample_prompts"])
        cfg = TrainConfig(**known)
        cfg.validate()
        return cfg


# ---- checks shared by the settings -----------------------------------------------------

MAX_RANK = 256  # LoRA rank, trained or loaded
MAX_ALPHA = 1024  # LoRA alpha to train with: real runs use 1..2 x rank; alpha / r past ~1024 overflows a step
# alpha of a loaded adapter (after rsLoRA's alpha * sqrt(r)): real ones stay far below; 1e300 only overflows
MAX_LOADED_ALPHA = 10_000.0
MAX_PROMPTS = 8  # sample prompts continued at each evaluation
MAX_PROMPT_CHARS = 4000  # prompts: GPT-2 sees at most 1024 tokens (~4,000 characters of English) anyway


def whole_number(name: str, v, lo: int, hi: int) -> None:
    """An int (not a bool, not a float such as inf or 2.0) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi} (got {v!r}).")


def real_number(name: str, v, lo: float, hi: float, what: str, *, above: bool = False,
                below: bool = False, hint: str = "") -> None:
    """A finite int/float in [lo, hi] (`above`/`below` make that end open); `what` says the range,
    `hint` (after the value) what to do."""
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN != NaN
          and (v > lo if above else v >= lo) and (v < hi if below else v <= hi))
    if not ok:
        raise ValueError(f"{name} must be {what} (got {v!r}){hint}.")


def check_prompts(prompts) -> None:
    """Sample prompts: a short list of valid texts (a lone surrogate would break every page that
    shows the run's samples, since they cannot be encoded)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or \
            not all(isinstance(p, str) for p in prompts):
        raise ValueError("sample prompts must be a list of texts.")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"use at most {MAX_PROMPTS} sample prompts (got {len(prompts)}).")
    for i, p in enumerate(prompts, 1):
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"sample prompt {i} is {len(p)} characters long; the limit is {MAX_PROMPT_CHARS}.")
        bad = next((j for j, ch in enumerate(p, 1) if "\ud800" <= ch <= "\udfff"), None)
        if bad is not None:
            raise ValueError(f"sample prompt {i} holds invalid text (a lone surrogate at character {bad}); "
                             f"retype it.")
