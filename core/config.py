"""Configuration dataclasses: model shapes, LoRA settings, training settings."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

# The four GPT-2 projections LoRA may wrap (HF module names inside each block).
TARGET_MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
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
        per_block = 12 * d * d + 13 * d  # qkv, proj, 4x mlp, biases and two layer norms
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

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def validate(self, cfg: GPTConfig | None = None) -> None:
        """Raise ValueError with a message a user can act on."""
        if not isinstance(self.r, int) or self.r < 1 or self.r > 256:
            raise ValueError(f"rank must be a whole number from 1 to 256 (got {self.r}).")
        if cfg is not None and self.r > cfg.n_embd:
            raise ValueError(f"rank {self.r} is larger than the model width {cfg.n_embd}; choose a rank <= {cfg.n_embd}.")
        if not (self.alpha > 0) or self.alpha != self.alpha:
            raise ValueError(f"alpha must be a positive number (got {self.alpha}).")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout}).")
        if not self.targets:
            raise ValueError(f"choose at least one target module from {', '.join(TARGET_MODULES)}.")
        for t in self.targets:
            if t not in TARGET_MODULES:
                raise ValueError(f"unknown target module {t!r}; choose from {', '.join(TARGET_MODULES)}.")

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
        def whole(name, v, lo, hi=None):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
                raise ValueError(f"{name} must be a whole number {rng} (got {v!r}).")

        whole("steps", self.steps, 1, 1_000_000)
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or not 0 < self.lr <= 1:
            raise ValueError(f"learning rate must be a number > 0 and <= 1, e.g. 3e-4 (got {self.lr!r}).")
        if self.warmup_steps is not None:
            whole("warmup steps", self.warmup_steps, 0, self.steps)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min lr ratio must be in [0, 1] (got {self.min_lr_ratio!r}).")
        whole("batch size", self.batch_size, 1, 4096)
        whole("sequence length", self.seq_len, 1, 1024)
        if cfg is not None and self.seq_len > cfg.block_size:
            raise ValueError(f"sequence length {self.seq_len} exceeds the model's context of "
                             f"{cfg.block_size} tokens; choose a sequence length <= {cfg.block_size}.")
        whole("gradient accumulation steps", self.grad_accum, 1, 4096)
        if not math.isfinite(self.grad_clip) or self.grad_clip < 0:
            raise ValueError(f"gradient clip must be >= 0, 0 turns it off (got {self.grad_clip!r}).")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0 (got {self.weight_decay!r}).")
        whole("eval interval", self.eval_interval, 0)
        whole("eval max batches", self.eval_max_batches, 1)
        whole("checkpoint interval", self.checkpoint_interval, 0)
        whole("checkpoints to keep", self.keep_checkpoints, 0)
        whole("sample tokens", self.sample_tokens, 1, 1024)
        if isinstance(self.sample_prompts, str) or not all(isinstance(p, str) for p in self.sample_prompts):
            raise ValueError("sample prompts must be a list of texts.")
        whole("seed", self.seed, 0, 2**63 - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sample_prompts"] = list(self.sample_prompts)
        return d

    @staticmethod
    def from_dict(d: dict) -> "TrainConfig":
        known = {k: v for k, v in d.items() if k in TrainConfig.__dataclass_fields__}
        if "sample_prompts" in known:
            known["sample_prompts"] = tuple(known["sample_prompts"])
        return TrainConfig(**known)
