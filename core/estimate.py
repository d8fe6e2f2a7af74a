"""Memory and time estimates for a LoRA run, shown before training starts.

Memory = frozen weights + LoRA state (fp32 weights, grads, two AdamW moments) + activations
saved for the backward pass + the logits/loss buffers. Time uses the FLOP count of LoRA training
with a frozen base (forward + input gradients, no weight gradients) and a sustained throughput
per device kind, measured on our engine (see bench/ and the README's tables).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import GPTConfig, LoraConfig, TrainConfig
from .lora import count_lora_params

# Sustained training FLOP/s of this engine by device kind (measured: README performance tables).
THROUGHPUT = {"cuda": 450e12, "mps": 4e12, "cpu": 0.16e12}
# The vocabulary softmax is memory-bound: bytes moved per token per vocabulary entry, and the
# effective bandwidth for it.
VOCAB_BYTES = 16
BANDWIDTH = {"cuda": 2e12, "mps": 50e9, "cpu": 0.5e9}
# Fixed cost per block per micro-step (kernel launches, Python): dominant for small batches.
# Measured on the H200: ~1.4 ms eager, ~0.08 ms with the step captured as a CUDA graph.
LAYER_OVERHEAD = {"cuda": 1.4e-3, "cuda-graphs": 0.08e-3, "mps": 1e-3, "cpu": 1e-3}
# Values saved per token per block for the backward pass, in units of the width (ln, qkv, attn
# out, proj in, ln, fc out, gelu out, residuals), measured against peaks on CUDA.
ACT_PER_TOKEN_LAYER = 18
BYTES = {"fp32": 4, "bf16": 2, "nf4": 0.5 + 0.0625, "int8": 1 + 0.0625}


@dataclass
class Estimate:
    peak_bytes: int  # expected peak device memory of a training step
    weights_bytes: int  # the frozen base
    lora_bytes: int  # LoRA weights + gradients + AdamW state
    activation_bytes: int  # saved activations + logits buffers
    step_seconds: float  # one optimizer step (batch x grad_accum sequences)
    total_seconds: float  # the whole run
    trainable_params: int
    adapter_bytes: int  # the saved adapter file (fp32)
    share_percent: float  # trainable share of the model's parameters

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def flops_per_token(cfg: GPTConfig, seq_len: int, lora_params: int = 0) -> float:
    """Forward + input-gradient FLOPs per trained token with a frozen base (design guide's count)."""
    n = cfg.n_params() - cfg.block_size * cfg.n_embd  # position embeddings cost no matmul
    attn = 12 * seq_len * cfg.n_embd * cfg.n_layer  # QK^T and AV, forward and backward
    return 4 * n + attn + 6 * lora_params


def estimate_training(cfg: GPTConfig, lcfg: LoraConfig, tcfg: TrainConfig, device_type: str = "cpu",
                      weights: str | None = None, checkpointing: bool = False,
                      cuda_graphs: bool = False) -> Estimate:
    """device_type: 'cuda', 'mps' or 'cpu'; weights: 'fp32', 'bf16', 'int8' or 'nf4' (default by device)."""
    weights = weights or ("bf16" if device_type == "cuda" else "fp32")
    act_bytes = 2 if device_type == "cuda" else 4
    lora_params = count_lora_params(cfg, lcfg.r, lcfg.targets)
    total = cfg.n_params()
    w_bytes = int(total * BYTES[weights])
    lora_bytes = lora_params * 16  # fp32 weight + grad + two AdamW moments
    B, T, d = tcfg.batch_size, tcfg.seq_len, cfg.n_embd
    per_layer = ACT_PER_TOKEN_LAYER * d + 2 * cfg.n_head * T / 64  # + attention softmax stats
    layers_kept = 1 if checkpointing else cfg.n_layer
    acts = B * T * (per_layer * act_bytes * layers_kept + (2 * d * act_bytes * cfg.n_layer if checkpointing else 0))
    # the loss runs over at most 8 pieces of >= 256 tokens (GPT.loss): one piece's logits,
    # fp32 log-softmax and gradient exist at a time
    piece = min(B * T, max(256, -(-B * T // 8)))
    logits = piece * cfg.vocab_size * (act_bytes + 4 + 4)
    act_total = int(acts + logits)
    kind = device_type if device_type in THROUGHPUT else "cpu"
    per_token = (flops_per_token(cfg, T, lora_params) / THROUGHPUT[kind]
                 + cfg.vocab_size * VOCAB_BYTES / BANDWIDTH[kind])
    overhead = cfg.n_layer * LAYER_OVERHEAD["cuda-graphs" if kind == "cuda" and cuda_graphs else kind]
    step_s = tcfg.grad_accum * (overhead + B * T * per_token)
    if checkpointing:
        step_s *= 4 / 3  # the forward runs twice
    return Estimate(
        peak_bytes=w_bytes + lora_bytes + act_total, weights_bytes=w_bytes, lora_bytes=lora_bytes,
        activation_bytes=act_total, step_seconds=step_s, total_seconds=step_s * tcfg.steps,
        trainable_params=lora_params, adapter_bytes=lora_params * 4 + 2048,
        share_percent=100.0 * lora_params / total,
    )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_seconds(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
