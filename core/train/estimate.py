"""Memory and time estimates for a LoRA run, shown before training starts.

Memory = frozen weights + LoRA state (fp32 weights, grads, two AdamW moments) + activations
saved for the backward pass + the logits/loss buffers. Time uses the FLOP count of LoRA training
with a frozen base (forward + input gradients, no weight gradients) and a sustained throughput
per device kind, measured on our engine (see bench/ and docs/performance.md).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from core import device as _device
from core.lora.config import LoraConfig
from core.model.config import GPTConfig, target_shapes
from core.model.loss import piece_tokens, rows_that_fit
from core.train.config import TrainConfig
from core.lora.layers import count_lora_params
from core.lora import variants

# Sustained training FLOP/s of this engine by device kind (measured: docs/performance.md).
THROUGHPUT = {"cuda": 450e12, "mps": 4e12, "cpu": 0.16e12}
# The vocabulary softmax is memory-bound: bytes moved per token per vocabulary entry, and the
# effective bandwidth for it.
VOCAB_BYTES = 16
BANDWIDTH = {"cuda": 2e12, "mps": 50e9, "cpu": 0.5e9}
# Fixed cost per block per micro-step (kernel launches, Python): dominant for small batches, and mostly
# removed when the step is captured as a CUDA graph (the figures: docs/performance.md).
LAYER_OVERHEAD = {"cuda": 1.4e-3, "cuda-graphs": 0.08e-3, "mps": 1e-3, "cpu": 1e-3}
# Values saved per token per block for the backward pass, in units of the width (ln, qkv, attn
# out, proj in, ln, fc out, gelu out, residuals), measured against peaks on CUDA.
ACT_PER_TOKEN_LAYER = 18
# Memory a CPU training step touches whatever the model's size: library code paged in on first use, thread
# pools and allocator arenas, the same at every width (bench/memory.py). CUDA peaks are allocator figures,
# which exclude the context, so nothing is added there.
RUNTIME_BYTES = {"cpu": 88 * 2**20}
BYTES = {"fp32": 4, "bf16": 2, "nf4": 0.5 + 0.0625, "int8": 1 + 0.0625}
# Bytes of fp32 logits one forward may hold whole; larger micro-batches train the loss in pieces and
# evaluate fewer rows at a time. The trainer (core.train.trainer) follows this same rule.
class MemoryLimitError(ValueError):
    """Settings whose estimated peak memory exceeds what the machine has (or the configured cap)."""


@dataclass
class Estimate:
    peak_bytes: int  # expected peak device memory of a training step
    weights_bytes: int  # the frozen base
    lora_bytes: int  # LoRA weights + gradients + AdamW state
    activation_bytes: int  # saved activations + logits buffers (or evaluation's logits, if larger)
    logits_bytes: int  # the loss's logits buffers at their largest (a training piece or an evaluation group)
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
                      cuda_graphs: bool = False, weights_bytes: int | None = None) -> Estimate:
    """device_type: 'cuda', 'mps' or 'cpu'; weights: 'fp32', 'bf16', 'int8' or 'nf4' (default by device);
    weights_bytes: the real size of a loaded base (instead of its estimate)."""
    weights = weights or ("bf16" if device_type == "cuda" else "fp32")
    act_bytes = 2 if device_type == "cuda" or weights == "bf16" else 4  # bf16 weights: bf16 activations
    variant = variants.of(lcfg)
    lora_params = count_lora_params(cfg, lcfg.r, lcfg.targets, lcfg)  # per-module ranks, DoRA magnitudes
    # PiSSA/OLoRA keep their frozen start beside A and B (core.lora.variants): computed with, saved with, not trained
    frozen = lora_params if lcfg.init in variants.RESIDUAL_INITS else 0
    total = cfg.n_params()
    w_bytes = int(total * BYTES[weights]) if weights_bytes is None else int(weights_bytes)
    lora_bytes = lora_params * 16 + frozen * 4  # fp32 weight + grad + two AdamW moments; the frozen start
    B, T, d = tcfg.batch_size, tcfg.seq_len, cfg.n_embd
    per_layer = ACT_PER_TOKEN_LAYER * d + 2 * cfg.n_head * T / 64  # + attention softmax stats
    layers_kept = 1 if checkpointing else cfg.n_layer
    # DoRA keeps x W + s B A x of every target for the magnitude's gradient: one number per trained magnitude
    # per token (tests/test_estimate.py holds this to what autograd saves)
    per_layer += sum(variant.extra_params(target_shapes(cfg)[t][1]) for t in lcfg.targets)
    acts = B * T * (per_layer * act_bytes * layers_kept + (2 * d * act_bytes * cfg.n_layer if checkpointing else 0))
    logits = logits_bytes(cfg.vocab_size, B, T, act_bytes)
    act_total = int(max(acts + logits[0], logits[1]))
    kind = device_type if device_type in THROUGHPUT else "cpu"
    per_token = (flops_per_token(cfg, T, lora_params + frozen) / THROUGHPUT[kind]
                 + cfg.vocab_size * VOCAB_BYTES / BANDWIDTH[kind])
    overhead = cfg.n_layer * LAYER_OVERHEAD["cuda-graphs" if kind == "cuda" and cuda_graphs else kind]
    step_s = tcfg.grad_accum * (overhead + B * T * per_token)
    if checkpointing:
        step_s *= 4 / 3  # the forward runs twice
    return Estimate(
        peak_bytes=w_bytes + lora_bytes + act_total + RUNTIME_BYTES.get(kind, 0), weights_bytes=w_bytes,
        lora_bytes=lora_bytes,
        activation_bytes=act_total, logits_bytes=int(max(logits)), step_seconds=step_s,
        total_seconds=step_s * tcfg.steps, trainable_params=lora_params,
        adapter_bytes=(lora_params + frozen) * 4 + 2048,
        share_percent=100.0 * lora_params / total,
    )


def logits_bytes(vocab: int, batch_size: int, seq_len: int, act_bytes: int) -> tuple[int, int]:
    """(training, evaluation) bytes of the loss's logits buffers, by the trainer's own rule.

    Training: one piece of the micro-batch's logits at a time (core.model.loss.piece_tokens: all of them
    while they fit the budget), with its fp32 log-softmax and gradient. Evaluation (no gradients, between
    steps): the whole rows that fit (core.model.loss.rows_that_fit), an fp32 copy of half-precision
    ones, and the fp32 log-softmax.
    """
    tokens = batch_size * seq_len
    train = piece_tokens(tokens, vocab) * vocab * (act_bytes + 4 + 4)
    rows = min(batch_size, rows_that_fit(seq_len, vocab))
    evaluation = rows * seq_len * vocab * (act_bytes + 4 + (4 if act_bytes != 4 else 0))
    return train, evaluation


def check_memory(est: Estimate, device: torch.device, cap: int | None = None, loaded: bool = False,
                 advice: str = "") -> None:
    """Refuse (MemoryLimitError) a run whose estimated peak exceeds `cap` (--max-train-memory) or the
    memory available on `device` now, whichever is smaller. loaded: the base is in memory already
    (its weights are part of the estimate but no longer part of what is available). advice: what to
    lower, for the message."""
    limits = []
    if cap is not None:
        limits.append((int(cap), "allowed by --max-train-memory"))
    free = _device.available_memory(device)
    if free is not None:
        limits.append((free + (est.weights_bytes if loaded else 0), "of memory available now"))
    if not limits:
        return
    limit, why = min(limits)
    if est.peak_bytes > limit:
        raise MemoryLimitError(f"this run needs about {human_bytes(est.peak_bytes)} of memory (estimate), more "
                               f"than the {human_bytes(limit)} {why}; {advice or 'use smaller settings'}.")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])i?b?|b)?\s*$", re.I)


def parse_size(spec) -> int:
    """'8GB', '512mb', '1.5 GiB' or a number of bytes -> bytes (KB, MB, GB, TB are powers of 1024)."""
    m = _SIZE.match(str(spec))
    value = float(m.group(1)) * 1024 ** " kmgt".index((m.group(2) or " ").lower()) if m else 0.0
    if not (math.isfinite(value) and value >= 1):  # a 400-digit number is inf as a float
        raise ValueError(f"{spec!r} is not a memory size; write it like 8GB, 512MB or 1.5GiB.")
    return int(value)


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
