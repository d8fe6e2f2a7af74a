"""GPT-2's shapes: the target projections, GPTConfig, the presets and their hub ids. LoRA settings live in
core.lora.config, training settings in core.train.config, the checks they share in core.checks."""
from __future__ import annotations

from dataclasses import dataclass

# The four GPT-2 projections LoRA may wrap (HF module names inside each block): their one spelling in
# the code base, every other module names them by these constants.
ATTN_QKV = "attn.c_attn"  # attention's fused query/key/value projection
ATTN_OUT = "attn.c_proj"  # attention's output projection
MLP_UP = "mlp.c_fc"  # the MLP's up-projection
MLP_DOWN = "mlp.c_proj"  # the MLP's down-projection
# Their (in, out) features as multiples of the model width n_embd: c_attn makes q, k and v at once, and
# the MLP is 4x wider than the model. Every shape, count and width rule derives from this table.
TARGET_WIDTHS = {ATTN_QKV: (1, 3), ATTN_OUT: (1, 1), MLP_UP: (1, 4), MLP_DOWN: (4, 1)}
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
