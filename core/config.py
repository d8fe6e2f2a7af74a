"""Configuration dataclasses: model shapes, LoRA settings, training settings."""
from __future__ import annotations

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
