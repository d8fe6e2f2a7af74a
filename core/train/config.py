"""Training settings: TrainConfig (steps, learning rate, batch, evaluation and checkpoint cadence, seed)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from core.checks import check_prompts, real_number, true_or_false, whole_number
from core.model.config import GPTConfig


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
    cuda_graphs: bool = True  # on GPUs, replay each micro-step as a CUDA graph (small batches: far fewer launches)

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
        true_or_false("cuda graphs", self.cuda_graphs)

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
