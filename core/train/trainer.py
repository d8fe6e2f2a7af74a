"""One LoRA training run: AdamW on one adapter's weights, warmup + cosine schedule, events, a stop
flag, checkpoints that resume bit-for-bit, and clear failures (NaN loss, out of memory).

A Trainer is one run's state machine; core.train.loop.TrainLoop drives it (alone, co-batched with other
runs by core.train.jobs, under torchrun, or in chunks) and hands its plain-dict events to the caller.
The base model is shared, never copied: the adapter is added to it, trained through `route=name` (other
adapters' generations on the same model are unaffected) and left loaded under that name at the end.
`setup()` adds it (and builds the optimizer); the studio calls it under its engine lock, open() calls it
when nobody did.

Events (plain dicts of str/int/float/None/list, safe to hand between threads):
    start       name, step (0, or the resumed step), steps, batch_size, seq_len (after fitting the data),
                grad_accum, tokens_per_step, trainable_params, device, autocast ('bf16' | None),
                out_dir, resumed_from
    info        message (e.g. the block size was reduced to fit short data)
    step        step, steps, loss, lr, grad_norm, step_time (s), tokens_per_sec, eta (s), elapsed (s, this
                process), tokens
    eval        step, val_loss, val_ppl, val_tokens (at step 0, every eval_interval steps and at the end)
    sample      step, samples: [{prompt, text}] (after each eval when sample_prompts are set)
    checkpoint  step, path
    done        status ('finished' | 'stopped'), step, steps, path (the run folder), checkpoint,
                train_loss, val_loss, elapsed
    error       kind ('nan' | 'oom' | 'disk' | 'internal'), step, message, checkpoint (the last good one or
                None); the run ends after it

Run folder layout:
    <run>/adapter_model.safetensors, adapter_config.json, studio.json   the adapter (finished/stopped)
    <run>/history.jsonl              one line per step, appended at each checkpoint (core.adapters.run_record)
    <run>/checkpoints/step_000050/   the same files + trainer_state.pt (resume state); its history.jsonl is
                                     a hard link to the run's, of which its studio.json owns the first bytes
"""
from __future__ import annotations

import io
import json
import math
import pickle
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core import atomic
from core.adapters import run_record
from core.atomic import disk_full
from core.checks import is_real, is_whole
from core.adapters.format import WEIGHTS, save_adapter
from core.adapters.run_record import META
from core.adapters.library import (CHECKPOINTS, RESUMABLE, TRAINER_STATE, checkpoint_dirs, checkpoint_path,
                                   checkpoint_step)
from core.lora import keys
from core.lora.config import LoraConfig
from core.train.config import TrainConfig
from core.train.data import Dataset, get_batch
from core.train.evaluate import EVAL_TOKENS, Stopped, evaluation
from core.device import GUARD, autocast_for, is_oom
from core.model.loss import IGNORE, piece_tokens
from core.train.estimate import check_memory, estimate_training
from core.generate.sampling import SamplingConfig, generate_text
from core.lora.variants import check_fits as check_init_fits
from core.lora.variants import RESIDUAL_INITS
from core.lora.layers import (Segment, Segments, add_adapter, adapter_names, adapter_state_dict,
                              lora_param_groups, lora_parameters)
from core.train.distributed import local_rows
from core.model.quant import weight_bytes

STATE = TRAINER_STATE
# Bytes a save writes beyond the adapter's weights (and optimizer state): its JSON files and history lines
SAVE_MARGIN = 1 << 20


class _Loss(torch.nn.Module):
    """The loss of one micro-batch as a module, the form torch.cuda.make_graphed_callables captures.

    Its parameters are this adapter's alone: the shared model is held outside the module tree, so
    other loaded adapters are not taken for inputs of the captured graph.
    """

    def __init__(self, model, name: str, chunk: int):
        super().__init__()
        self.params = torch.nn.ParameterList(lora_parameters(model, name))
        self.__dict__["model"] = model  # not a submodule
        self.name, self.chunk = name, chunk

    def forward(self, x, y):
        return self.model.loss(x, y, self.name, chunk=self.chunk)


class TrainingError(RuntimeError):
    """A run that cannot go on (its 'error' event, raised by a caller that wants an exception); the message
    says what to do."""


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    warm = tcfg.warmup()
    if step < warm:
        return tcfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, tcfg.steps - warm)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return tcfg.lr * (tcfg.min_lr_ratio + (1.0 - tcfg.min_lr_ratio) * cosine)


def failure_message(e: BaseException, step: int, kept: str | None) -> str:
    """One sentence for a run that ended at `step` on an error in its own work (`kept`: its newest checkpoint
    on disk, or None): what went wrong, without a server path, and what is left to resume from."""
    have = f"its checkpoint of step {checkpoint_step(kept)} is kept" if kept else "no checkpoint had been saved yet"
    if disk_full(e):
        fix = "free some space, then Resume" if kept else "free some space and start it again"
        return f"training stopped at step {step}: not enough disk space to save ({e.strerror}); {have}, so {fix}."
    what = e.strerror if isinstance(e, OSError) and e.strerror else (
        str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
    return f"training failed at step {step} ({what}); {have}."


# ---- resume points --------------------------------------------------------------------

@dataclass
class Checkpoint:
    """A saved training state that `Trainer(resume=...)` continues from."""
    path: Path  # the checkpoint folder
    step: int  # optimizer steps done
    name: str  # the adapter name of the run
    lcfg: LoraConfig
    tcfg: TrainConfig
    meta: dict  # its studio.json


@dataclass
class TrainState:
    """A run between two optimizer steps, all of it, as plain data and CPU tensors (picklable): what
    core.train.loop.train_chunk returns, and what `Trainer(resume=state)` continues from exactly, in
    this process or another (a ZeroGPU worker). Nothing of it is on disk."""
    step: int  # optimizer steps done
    name: str  # the adapter name of the run
    lcfg: LoraConfig
    tcfg: TrainConfig
    meta: dict  # its studio.json fields now (base model, dataset name and sha256)
    weights: dict  # the adapter's tensors (adapter_state_dict keys), on the CPU
    optimizer: dict  # the optimizer's state_dict, its tensors on the CPU
    np_rng: dict  # the batch order's bit generator state
    torch_rng: torch.Tensor | None  # the dropout RNG's state (None without dropout)
    start_val_loss: float | None
    history: list  # the steps not yet appended to the run's history.jsonl
    history_bytes: int  # that file's length as the newest record says
    lasts: dict  # the newest value of each history field
    saved_step: int | None  # the step of the newest checkpoint on disk (None: none yet)
    path = None  # not a folder: a resume point in memory


def _on_cpu(x):
    """`x` (a state_dict's nesting of dicts, lists and tensors) with every tensor copied to the CPU."""
    if torch.is_tensor(x):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _on_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_on_cpu(v) for v in x)
    return x


def _label(path: Path) -> str:
    """A checkpoint or run folder as users name it ('run@step_000050', 'run'): never the server's path."""
    return f"{path.parent.parent.name}@{path.name}" if path.parent.name == CHECKPOINTS else path.name


def find_checkpoint(path) -> Checkpoint:
    """A checkpoint folder, or a run folder (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path.name}: no such run or checkpoint folder.")
    if not (path / STATE).is_file():
        found = checkpoint_dirs(path, RESUMABLE)
        if not found:
            raise ValueError(f"{path.name} holds no checkpoint to resume ({CHECKPOINTS}/step_*/{STATE}).")
        path = found[-1]
    try:
        meta = run_record.load(path)
        lcfg = LoraConfig.from_dict(meta["lora"])
        tcfg = TrainConfig.from_dict(meta["training"])
        step, name = meta["steps"], meta["name"]
        if not is_whole(step, 0) or not isinstance(name, str):
            raise ValueError(f"steps {step!r} or name {name!r} is not a step count and a name")
        return Checkpoint(path, step, name, lcfg, tcfg, meta)
    # RecursionError: deeply nested JSON; OverflowError: numbers such as 1e400
    except (OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError) as e:
        why = e.strerror if isinstance(e, OSError) else e  # an OSError's text holds the server's path
        raise ValueError(f"{_label(path)}/{META} is missing or damaged ({type(e).__name__}: {why}); "
                         f"resume from another checkpoint.") from None


# ---- the trainer ----------------------------------------------------------------------

@dataclass
class _Prepared:
    """What Trainer.setup() made for the run loop."""
    rng: np.random.Generator  # the batch order
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]  # the adapter's, the only ones trained
    loss_fn: Callable  # one micro-batch's loss alone: eager, or replayed CUDA graphs
    graph_note: str | None  # why CUDA graphs were wanted but are not used
    dropout_gen: torch.Generator | None  # this run's own LoRA dropout RNG (None without dropout)
    chunk: int  # tokens per piece of the loss alone (core.model.loss.piece_tokens)


@dataclass
class _StepState:
    """One optimizer step in progress: its micro-batches so far and how to take them back."""
    micro: int = 0  # micro-batches done (forward + backward)
    loss_sum: torch.Tensor | None = None
    lr: float = 0.0
    t0: float = 0.0
    rng_before: dict | None = None  # the batch order before the step (Stop rewinds to it)
    gen_before: torch.Tensor | None = None  # the dropout RNG before the step


@dataclass
class _Progress:
    """The run loop's bookkeeping between optimizer steps."""
    last_good: str | None  # the newest checkpoint on disk
    saved_step: int | None  # the step of the last checkpoint saved (or resumed from)
    t_run: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0  # training seconds of the run before this process resumed it (its history's)
    recent: deque = field(default_factory=lambda: deque(maxlen=20))  # recent step times, for the ETA


class Trainer:
    """One training run of adapter `name` on a shared base model.

    model: a loaded base (core.model.weights.load_base), shared with other users; never copied.
    dataset: a core.train.data.Dataset. out_dir: the run folder (adapter + checkpoints/).
    stop: set it (from any thread) to end the run within one optimizer step; the adapter is saved.
    resume: a Checkpoint or a run/checkpoint folder; its LoRA settings and step are used, and
        `tcfg` (default: the checkpoint's) may extend the number of steps. Or a TrainState (a chunk's
        end, core.train.loop.train_chunk): the run goes on exactly where it was.
    max_memory: a cap in bytes on the run's estimated peak memory (--max-train-memory); the memory
        available on the device caps it too. Settings above it are refused here, before the adapter,
        the optimizer or any batch exists.
    meta: fields written over the trainer's own in studio.json of the adapter and of every
        checkpoint, e.g. {"name": the run's library name, "user": the signed-in user}.
    dist: a core.train.distributed.Group when torchrun trains the run on several processes (tcfg's
        batch size is then the total of all of them; this process computes its share).
    """

    def __init__(self, model, dataset: Dataset, lcfg: LoraConfig | None, tcfg: TrainConfig | None,
                 name: str, out_dir, stop: threading.Event | None = None, *, base_id: str = "",
                 resume=None, max_memory: int | None = None, meta: dict | None = None, dist=None):
        self.resume = resume if resume is None or isinstance(resume, (Checkpoint, TrainState)) else find_checkpoint(resume)
        if self.resume is not None:
            lcfg, tcfg = self.resume.lcfg, tcfg or self.resume.tcfg
            name = name or self.resume.name
            base_id = base_id or self.resume.meta.get("base_model", "")
            if dataset.sha256 != self.resume.meta.get("dataset", {}).get("sha256"):
                raise ValueError(f"{dataset.name or 'this dataset'} is not the dataset the run was trained on "
                                 f"({self.resume.meta.get('dataset', {}).get('name', '?')}); resume with that one.")
            if tcfg.steps <= self.resume.step:
                raise ValueError(f"the checkpoint is at step {self.resume.step}; ask for more steps than that "
                                 f"to resume (got {tcfg.steps}).")
        lcfg, tcfg = lcfg or LoraConfig(), tcfg or TrainConfig()
        lcfg.validate(model.config)
        check_init_fits(model, lcfg)
        if isinstance(self.resume, Checkpoint) and lcfg.init in RESIDUAL_INITS:  # it holds the converted file
            raise ValueError(f"a {lcfg.init} run cannot be resumed from a checkpoint (it saves a converted "
                             f"rank-{2 * lcfg.r} LoRA, not its A and B); start a new run.")
        tcfg.validate(model.config)
        self.model, self.dataset, self.lcfg, self.tcfg = model, dataset, lcfg, tcfg
        self.name, self.out_dir, self.base_id = name, Path(out_dir), base_id
        self.extra_meta = dict(meta or {})
        self.stop = stop or threading.Event()
        if self.resume is None and ((self.out_dir / WEIGHTS).exists() or checkpoint_dirs(self.out_dir, RESUMABLE)):
            raise ValueError(f"{self.out_dir.name} already holds a training run; choose another name, "
                             f"or resume it.")
        self.seq_len, self.block_note = dataset.block_size(tcfg.seq_len)
        self.dist = dist
        self._rank_share = 1.0  # under torchrun with a loss mask: this rank's weight in the ranks' average (draw)
        self._check_memory(max_memory)
        self.history: list[dict] = []  # the steps not yet appended to the run's history file (history.jsonl)
        self._history_bytes = 0  # that file's length as the newest record (checkpoint) says
        self._lasts: dict = {}  # the newest value of each history field (train and val loss, elapsed)
        self.step = 0
        self.start_val_loss: float | None = None
        self._prepared: _Prepared | None = None
        self._progress: _Progress | None = None
        self._pending = _StepState()
        self.outcome: str | None = None  # 'finished', 'stopped' or 'failed' once the run has ended

    # -- public --------------------------------------------------------------------------

    @property
    def tokens_per_step(self) -> int:
        return self.tcfg.batch_size * self.seq_len * self.tcfg.grad_accum

    def setup(self) -> None:
        """Add the adapter to the shared model, build the optimizer, load the resume state and prepare
        the micro-step (CUDA graphs are captured here). This changes the shared model's structure, so
        the studio calls it under the engine lock; open() calls it when nobody did. Runs once."""
        if self._prepared is not None:
            return
        model, tcfg = self.model, self.tcfg
        rng = np.random.default_rng(tcfg.seed)
        if self.resume is None or self.name not in adapter_names(model):
            add_adapter(model, self.name, self.lcfg, seed=tcfg.seed)
        gen = None
        if self.lcfg.dropout > 0:  # its own RNG: the masks do not depend on other users' work
            gen = torch.Generator(device=model.device)
            gen.manual_seed(tcfg.seed)
        params = lora_parameters(model, self.name)
        # LoRA+ puts B in a faster group; without it one group, as checkpoints written before LoRA+ expect
        ratio = self.lcfg.loraplus_lr_ratio
        groups = params if ratio == 1 else lora_param_groups(model, self.name, tcfg.lr, ratio)
        opt = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay,
                                fused=model.device.type == "cuda" or None)
        if self.resume is not None:
            rng = self._load_resume(opt, gen)
        chunk = piece_tokens(self._rows * self.seq_len, model.config.vocab_size)
        loss_fn, graph_note = self._loss_fn(chunk, self._rows, self.seq_len, gen)
        self._prepared = _Prepared(rng, opt, params, loss_fn, graph_note, gen, chunk)

    # -- the steps, one micro-batch at a time (core.train.loop.TrainLoop drives runs through them) --

    def open(self) -> Iterator[dict]:
        """Set up (unless done), then the 'start' events and the first validation loss."""
        self.setup()
        yield from self._start_events()
        if self.resume is None:
            if self.dist is None or self.dist.writes:
                run_record.drop_history(self.out_dir)  # left by a run that saved nothing in this folder
            self.start_val_loss = yield from self._eval()
        before = self._last("elapsed")  # a resumed run's training time so far
        self._progress = _Progress(last_good=self._latest_checkpoint(),
                                   saved_step=getattr(self.resume, "saved_step", self.resume.step)
                                   if self.resume else None,
                                   elapsed_before=float(before) if is_real(before) else 0.0)
        if self.step >= self.tcfg.steps or self.stop.is_set():
            yield from self.stopped() if self.stop.is_set() else self._close("finished")

    def begin_micro(self) -> None:
        """Before a micro-batch: at the start of an optimizer step, its learning rate and rewind point."""
        st, prep = self._pending, self._prepared
        if st.micro == 0:
            st.rng_before, st.gen_before = prep.rng.bit_generator.state, self._dropout_state()
            st.lr = lr_at(self.step, self.tcfg)
            for g in prep.opt.param_groups:
                g["lr"] = st.lr * g.get("lr_ratio", 1.0)
            st.t0 = time.perf_counter()
            st.loss_sum = torch.zeros((), device=self.model.device)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch (inputs, targets), each (batch_size, seq_len), from this run's own order."""
        x, y = get_batch(self.dataset.train, self.tcfg.batch_size, self.seq_len, self._prepared.rng,
                         self.model.device, mask=self.dataset.train_mask)
        if self.dist is None:
            return x, y
        lx, ly = local_rows(x, y, self.dist)  # under torchrun: this rank's rows of the global micro-batch
        if self.dataset.train_mask is not None:
            # masked targets differ per rank: one process averages over the whole micro-batch's response
            # tokens, so this rank's mean weighs (its tokens x ranks / all tokens) before the ranks' average
            total = int((y != IGNORE).sum())
            self._rank_share = int((ly != IGNORE).sum()) * self.dist.world / total if total else 1.0
        return lx, ly

    def end_micro(self, loss: torch.Tensor) -> Iterator[dict]:
        """After a micro-batch's backward (`loss`: its mean loss, detached): the optimizer step once all
        grad_accum micro-batches are in, then validation and checkpoints on their cadence."""
        st = self._pending
        st.loss_sum += loss
        st.micro += 1
        if st.micro < self.tcfg.grad_accum:
            return
        self._pending = _StepState()
        if not (yield from self._optimizer_step(st)):
            return
        yield from self._evaluate_and_checkpoint(self._progress)
        if self.step >= self.tcfg.steps:
            yield from self._close("finished")

    @property
    def _rows(self) -> int:
        """Rows of a micro-batch this process computes: all of them, or its share under torchrun."""
        return max(1, self.tcfg.batch_size // (self.dist.world if self.dist else 1))

    @property
    def between_steps(self) -> bool:
        """Whether no optimizer step is in progress (its state can be taken, a chunk can end)."""
        return self._pending.micro == 0

    @property
    def _writes(self) -> bool:
        """Whether this process writes the run's files (under torchrun rank 0 alone does)."""
        return self.dist is None or self.dist.writes

    @property
    def grad_accum(self) -> int:
        return self.tcfg.grad_accum

    def solo_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A micro-batch's mean loss when this run trains alone (a replayed CUDA graph on GPUs)."""
        loss = self._prepared.loss_fn(x, y)
        return loss * self._rank_share if self._rank_share != 1.0 else loss

    def segment(self, start: int, length: int) -> Segment:
        """This run's rows in a co-batched step: its micro-batch from row `start`, `length` tokens each."""
        return Segment(self.name, start, start + self.tcfg.batch_size, length, self._prepared.dropout_gen)

    def mark(self) -> tuple:
        """What a micro-batch changes (batch order, dropout RNG, gradients), to undo it (`undo`)."""
        grads = [None if p.grad is None else p.grad.clone() for p in self._prepared.params]
        return self._prepared.rng.bit_generator.state, self._dropout_state(), grads, self._pending.micro

    def undo(self, mark: tuple) -> None:
        """Take back the micro-batch started after `mark` (an out-of-memory error in a shared step)."""
        rng, gen, grads, micro = mark
        self._prepared.rng.bit_generator.state = rng
        self._dropout_state(gen)
        for p, g in zip(self._prepared.params, grads):
            p.grad = g
        if micro == 0:
            self._pending = _StepState()

    def stopped(self) -> Iterator[dict]:
        """Stop between micro-batches: a partial step is dropped and its batches rewound (a resume draws
        them again); the adapter and a resume point are saved."""
        st = self._pending
        if st.micro:
            self._prepared.opt.zero_grad(set_to_none=True)
            self._prepared.rng.bit_generator.state = st.rng_before
            self._dropout_state(st.gen_before)
            self._pending = _StepState()
        yield from self._close("stopped")

    def out_of_memory(self) -> dict:
        """The run ends on an out-of-memory error: the 'error' event (the last checkpoint is kept)."""
        self._prepared.opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._end("failed")
        return {"type": "error", "kind": "oom", "step": self.step, "checkpoint": self._progress.last_good,
                "message": self._oom_message()}

    def failed(self, e: Exception) -> dict:
        """The run ends on an error in its own work between micro-batches (an evaluation, a checkpoint or
        the adapter's save, e.g. on a full disk): the 'error' event, saying whether a checkpoint is kept.
        Nothing else is saved; the shared model and other runs are not touched."""
        if is_oom(e) and self._progress is not None:
            return self.out_of_memory()
        self.abort()
        kept = self._latest_checkpoint()
        return {"type": "error", "kind": "disk" if disk_full(e) else "internal", "step": self.step,
                "checkpoint": kept, "message": failure_message(e, self.step, kept)}

    def abort(self) -> None:
        """The run ends on an unexpected error (raised by whoever steps it): nothing more is saved."""
        if self._prepared is not None:
            self._prepared.opt.zero_grad(set_to_none=True)
        self._end("failed")

    def _close(self, status: str) -> Iterator[dict]:
        self._end(status)
        yield from self._finish(self._progress, status)

    def _end(self, status: str) -> None:
        self.outcome = status

    def _start_events(self) -> Iterator[dict]:
        model, tcfg, prep = self.model, self.tcfg, self._prepared
        yield {"type": "start", "name": self.name, "step": self.step, "steps": tcfg.steps,
               "batch_size": tcfg.batch_size, "seq_len": self.seq_len, "grad_accum": tcfg.grad_accum,
               "tokens_per_step": self.tokens_per_step,
               "trainable_params": int(sum(p.numel() for p in prep.params)), "device": str(model.device),
               "autocast": "bf16" if isinstance(autocast_for(model), torch.autocast) else None,
               "out_dir": str(self.out_dir), "resumed_from": str(self.resume.path) if self.resume and self.resume.path else None}
        if self.block_note:
            yield {"type": "info", "message": self.block_note}
        if prep.graph_note:
            yield {"type": "info", "message": prep.graph_note}

    def _optimizer_step(self, st: _StepState):
        """The optimizer step once its micro-batches are in, and its 'step' event. Returns False when
        the loss or gradient is not finite (an 'error' event; the run ends as failed)."""
        tcfg, prep, progress = self.tcfg, self._prepared, self._progress
        if self.dist is not None:  # under torchrun: the gradient and loss of the global batch
            st.loss_sum = self.dist.average(prep.params, st.loss_sum, self.step + 1)
        norm = self._clip(prep.params)
        loss_val, norm_val = torch.stack([st.loss_sum / tcfg.grad_accum, norm]).tolist()  # the step's one sync
        if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
            prep.opt.zero_grad(set_to_none=True)
            self._end("failed")
            yield self._nan_event(loss_val, norm_val, progress.last_good)
            return False
        prep.opt.step()
        prep.opt.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - st.t0
        progress.recent.append(dt)
        elapsed = time.perf_counter() - progress.t_run
        # the run's metrics as its history keeps them (core.adapters.metrics downloads them): elapsed is the
        # training time since the run began, resumes included; wall_time the Unix time the step ended
        point = {"step": self.step, "loss": loss_val, "lr": st.lr, "grad_norm": norm_val,
                 "tokens_per_sec": self.tokens_per_step / dt, "elapsed": progress.elapsed_before + elapsed,
                 "wall_time": time.time()}
        self.history.append(point)
        self._lasts.update(point)
        yield {"type": "step", "step": self.step, "steps": tcfg.steps, "loss": loss_val, "lr": st.lr,
               "grad_norm": norm_val, "step_time": dt, "tokens_per_sec": self.tokens_per_step / dt,
               "eta": sum(progress.recent) / len(progress.recent) * (tcfg.steps - self.step),
               "elapsed": elapsed, "tokens": self.step * self.tokens_per_step}
        return True

    def _evaluate_and_checkpoint(self, progress: _Progress) -> Iterator[dict]:
        """The cadence after a step: validation every eval_interval steps, a checkpoint every
        checkpoint_interval steps, and both after the last step."""
        tcfg, prep = self.tcfg, self._prepared
        final = self.step == tcfg.steps
        if final or tcfg.eval_interval and self.step % tcfg.eval_interval == 0:
            yield from self._eval()
        if final or tcfg.checkpoint_interval and self.step % tcfg.checkpoint_interval == 0:
            progress.last_good = str(self._save_checkpoint(prep.opt, prep.rng, "finished" if final else "running"))
            progress.saved_step = self.step
            yield {"type": "checkpoint", "step": self.step, "path": progress.last_good}

    def _finish(self, progress: _Progress, status: str) -> Iterator[dict]:
        """A stopped run's resume point, then the adapter itself and the 'done' event."""
        prep = self._prepared
        if progress.saved_step != self.step:  # a stopped run: its resume point
            progress.last_good = str(self._save_checkpoint(prep.opt, prep.rng, status))
            yield {"type": "checkpoint", "step": self.step, "path": progress.last_good}
        path = self._save_final(status)
        yield {"type": "done", "status": status, "step": self.step, "steps": self.tcfg.steps,
               "path": str(path), "checkpoint": progress.last_good, "train_loss": self._last("loss"),
               "val_loss": self._last("val_loss"), "elapsed": time.perf_counter() - progress.t_run}

    def _nan_event(self, loss_val: float, norm_val: float, last_good: str | None) -> dict:
        what = "NaN" if math.isnan(loss_val) or math.isnan(norm_val) else "infinite"
        kept = f"; the last good checkpoint {last_good} is kept" if last_good else ""
        return {"type": "error", "kind": "nan", "step": self.step + 1, "checkpoint": last_good,
                "message": f"the {'loss' if not math.isfinite(loss_val) else 'gradient'} became "
                           f"{what} at step {self.step + 1}, so the run stopped{kept}. Try a lower "
                           f"learning rate (now {self.tcfg.lr:g})."}

    # -- pieces ----------------------------------------------------------------------------

    def _loss_fn(self, chunk: int, B: int, T: int, gen: torch.Generator | None):
        """The micro-step's loss function, and a note for the user if CUDA graphs were wanted but failed.

        On a GPU the forward and backward are captured once as CUDA graphs and replayed: at small
        batches a step is otherwise bound by kernel launches, which a replay skips.
        Dropout, autocast (an fp32 base) and activation checkpointing keep the eager path.
        """
        model, name = self.model, self.name
        # with dropout, the one-job form of a co-batched step's route: the masks come from this run's RNG
        route = name if gen is None else Segments([Segment(name, 0, B, T, gen)])

        def plain(x, y):
            return model.loss(x, y, route, chunk=chunk)

        wanted = (self.tcfg.cuda_graphs and model.device.type == "cuda" and self.lcfg.dropout == 0
                  and not getattr(model, "checkpointing", False)
                  and not isinstance(autocast_for(model), torch.autocast))
        if not wanted:
            return plain, None
        try:
            x, y = get_batch(self.dataset.train, B, T, np.random.default_rng(0), model.device)
            with GUARD.exclusive():  # other users' generations wait while the step is captured
                graphed = torch.cuda.make_graphed_callables(_Loss(model, name, chunk), (x, y),
                                                            num_warmup_iters=3)
        except Exception as e:  # noqa: BLE001 - the eager path always works
            if is_oom(e):
                raise
            return plain, f"CUDA graphs are unavailable here ({type(e).__name__}); training without them."
        return graphed, None

    def _clip(self, params) -> torch.Tensor:
        if self.tcfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])

    def _dropout_state(self, state: torch.Tensor | None = None) -> torch.Tensor | None:
        """Get (or set, given a state) this run's dropout RNG state; None without dropout."""
        gen = self._prepared.dropout_gen
        if gen is None:
            return None
        if state is None:
            return gen.get_state()
        gen.set_state(state)
        return state

    def _eval(self):
        """Validation loss (+ samples) at the current step; yields events and returns the loss
        (None when Stop came during it: no event, no samples)."""
        t = self.tcfg
        windows = max(1, EVAL_TOKENS // self.seq_len)  # at most eval_max_batches x batch_size windows
        windows = windows if t.eval_max_batches is None else min(windows, t.eval_max_batches * t.batch_size)
        try:  # its chunks yield None: the training loop may run other work between them
            ev = yield from evaluation(self.model, [self.name], self.dataset.val, self.seq_len, windows * self.seq_len,
                                       stop=self.stop, mask=self.dataset.val_mask)
        except Stopped:
            return None
        loss, n = ev.scores[0].loss, ev.tokens
        if self.history and self.history[-1]["step"] == self.step:
            self.history[-1]["val_loss"] = self._lasts["val_loss"] = loss
        yield {"type": "eval", "step": self.step, "val_loss": loss,
               "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": n}
        if t.sample_prompts and not self.stop.is_set():
            scfg = SamplingConfig(max_new_tokens=t.sample_tokens, seed=t.seed)
            samples = [{"prompt": p, "text": generate_text(self.model, p, [self.name], scfg)[0]}
                       for p in t.sample_prompts]
            yield {"type": "sample", "step": self.step, "samples": samples}
        return loss

    def _last(self, key):
        return self._lasts.get(key, self.start_val_loss if key == "val_loss" else None)

    def _save_history(self) -> None:
        """Append the steps since the last save to the run's history file (only they are written)."""
        if self.history and (self.dist is None or self.dist.writes):  # rank 0 alone writes
            self._history_bytes = run_record.append(self.out_dir, self.history)
        self.history = []

    def _meta(self, status: str) -> dict:
        ds = self.dataset
        return {
            "name": self.name, "base_model": self.base_id, "status": status, "steps": self.step,
            "dataset": {"name": ds.name, "sha256": ds.sha256, "path": str(ds.path) if ds.path else None,
                        "train_tokens": int(len(ds.train)), "val_tokens": int(len(ds.val))},
            "training": {**self.tcfg.to_dict(), "seq_len_used": self.seq_len},
            "train_loss": self._last("loss"), "val_loss": self._last("val_loss"),
            "start_val_loss": self.start_val_loss, "history_bytes": self._history_bytes,
            **self.extra_meta,
        }

    def _check_room(self, with_state: bool) -> None:
        """Refuse a save the disk has no room for before anything is written (OSError ENOSPC, as the disk
        would say midway): the weights, with a checkpoint their optimizer state (2 more copies), and the JSON
        (a few KiB: the history is appended to its own file, see _save_history)."""
        weights = sum(p.numel() * p.element_size() for p in self._prepared.params)
        atomic.check_free(self.out_dir, weights * (3 if with_state else 1) + SAVE_MARGIN)

    def _save_final(self, status: str) -> Path:
        self._save_history()
        if self.dist is not None and not self.dist.writes:  # rank 0 alone writes
            return self.out_dir
        self._check_room(with_state=False)
        return save_adapter(self.model, self.name, self.out_dir, self.lcfg, self.base_id, self._meta(status))

    def _save_checkpoint(self, opt, rng, status: str) -> Path:
        """checkpoints/step_NNNNNN, published whole (never half a checkpoint, never a moment without one)."""
        folder = checkpoint_path(self.out_dir, self.step)
        self._save_history()
        if self.dist is not None and not self.dist.writes:  # rank 0 alone writes
            return folder
        self._check_room(with_state=True)
        root = folder.parent
        root.mkdir(parents=True, exist_ok=True)
        for junk in root.glob(".tmp-*"):  # left by a crash mid-save; this run is held, so none is live
            shutil.rmtree(junk, ignore_errors=True)
        state = {"step": self.step, "optimizer": opt.state_dict(),
                 "np_rng": json.dumps(rng.bit_generator.state), "torch_rng": self._dropout_state(),
                 "start_val_loss": self.start_val_loss}

        def build(tmp: Path):
            run_record.share(self.out_dir, tmp, self._history_bytes)
            save_adapter(self.model, self.name, tmp, self.lcfg, self.base_id, self._meta(status))
            buf = io.BytesIO()
            torch.save(state, buf)
            (tmp / STATE).write_bytes(buf.getvalue())
        # a checkpoint of the same step (a resumed run stopped again) is exchanged, never removed first
        final = atomic.publish_dir(folder, build, replace=True)
        keep = self.tcfg.keep_checkpoints
        if keep:
            for old in checkpoint_dirs(self.out_dir, RESUMABLE)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def _latest_checkpoint(self) -> str | None:
        found = checkpoint_dirs(self.out_dir, RESUMABLE)
        return str(found[-1]) if found else None

    def state(self) -> TrainState:
        """This run as a TrainState (between two optimizer steps: after open(), or at a step's end)."""
        if self._pending.micro or self._prepared is None:
            raise RuntimeError("a run's state is taken between two optimizer steps, after it was opened.")
        prep = self._prepared
        return TrainState(
            step=self.step, name=self.name, lcfg=self.lcfg, tcfg=self.tcfg, meta=self._meta("running"),
            weights=_on_cpu(adapter_state_dict(self.model, self.name)), optimizer=_on_cpu(prep.opt.state_dict()),
            np_rng=prep.rng.bit_generator.state, torch_rng=_on_cpu(self._dropout_state()),
            start_val_loss=self.start_val_loss, history=[dict(p) for p in self.history],
            history_bytes=self._history_bytes, lasts=dict(self._lasts), saved_step=self._progress.saved_step)

    def _load_resume(self, opt, gen: torch.Generator | None) -> np.random.Generator:
        """Adapter weights, optimizer, step and RNG from the resume point (all read and checked before any
        of them is applied)."""
        state = self.resume if isinstance(self.resume, TrainState) else self._read_checkpoint()
        where = f"checkpoint {_label(self.resume.path)}" if self.resume.path else "the saved training state"
        current = adapter_state_dict(self.model, self.name)
        loaded = state.weights
        if set(loaded) != set(current) or any(loaded[k].shape != current[k].shape for k in current):
            raise ValueError(f"{where} does not match its LoRA settings "
                             f"(rank {self.lcfg.r}, {', '.join(self.lcfg.targets)}) on this base model.")
        try:
            opt.load_state_dict(state.optimizer)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where} could not be read ({type(e).__name__} in its optimizer "
                             f"state); resume from another one.") from None
        with torch.no_grad():
            for k, p in current.items():
                p.copy_(loaded[k])
        if gen is not None and torch.is_tensor(state.torch_rng):
            try:
                gen.set_state(state.torch_rng)
            except (RuntimeError, TypeError):  # saved on another kind of device (or by an older version,
                pass                           # the global RNG's state): dropout masks differ from here on
        self.step, self.start_val_loss = state.step, state.start_val_loss
        self._lasts.update(state.lasts)
        self.history, self._history_bytes = [dict(p) for p in state.history], state.history_bytes
        if isinstance(self.resume, Checkpoint) and self._writes:  # the run's history becomes the checkpoint's
            self._history_bytes = run_record.adopt(self.out_dir, self.resume.path, self.resume.meta)
        rng = np.random.default_rng()
        rng.bit_generator.state = state.np_rng
        return rng

    def _read_checkpoint(self) -> TrainState:
        """The checkpoint on disk as a TrainState (its history stays in its history.jsonl)."""
        ck = self.resume
        try:
            state = torch.load(ck.path / STATE, map_location="cpu", weights_only=True)
            tensors = {keys.ours(k): v for k, v in load_file(str(ck.path / WEIGHTS)).items()}
            step, rng = _read_state(state)
        except (OSError, RuntimeError, SafetensorError, ValueError, pickle.UnpicklingError,
                KeyError, TypeError, RecursionError) as e:
            raise ValueError(f"checkpoint {_label(ck.path)} could not be read ({type(e).__name__}); "
                             f"resume from another one.") from None
        lasts: dict = {}
        for point in run_record.history(ck.path, ck.meta):
            lasts.update(point)
        return TrainState(step=step, name=ck.name, lcfg=ck.lcfg, tcfg=ck.tcfg, meta=ck.meta,
                          weights=tensors,
                          optimizer=state["optimizer"], np_rng=rng.bit_generator.state,
                          torch_rng=state.get("torch_rng"), start_val_loss=state.get("start_val_loss"),
                          history=[], history_bytes=0, lasts=lasts, saved_step=step)

    def _check_memory(self, cap: int | None) -> None:
        """Refuse settings whose estimated peak (at the sequence length really used, on this base
        with its real weight size) exceeds the cap or the memory available now."""
        model, t, r = self.model, self.tcfg, self.lcfg.r
        checkpointing = bool(getattr(model, "checkpointing", False))
        est = estimate_training(model.config, self.lcfg, replace(t, seq_len=self.seq_len, batch_size=self._rows),
                                model.device.type, weights="bf16" if model.dtype == torch.bfloat16 else None,
                                checkpointing=checkpointing, weights_bytes=weight_bytes(model))  # bf16 base: bf16 acts
        advice = (f"lower the batch size (now {t.batch_size}), the sequence length (now {self.seq_len}) or the "
                  f"rank (now {r})" + ("" if checkpointing else ", or use --checkpointing (recomputes "
                                                                 "activations: less memory, more time)")
                  + "; gradient accumulation keeps the effective batch at no memory cost")
        check_memory(est, model.device, cap, loaded=True, advice=advice)

    def _oom_message(self) -> str:
        t, cfg = self.tcfg, self.model.config
        return (f"out of memory at batch size {t.batch_size} x sequence length {self.seq_len} "
                f"(rank {self.lcfg.r}, a {cfg.n_layer}-layer width-{cfg.n_embd} model). Lower the batch "
                f"size (raise gradient accumulation to keep the effective batch), the sequence length "
                f"or the rank, or use a smaller model size.")


def _read_state(state) -> tuple[int, np.random.Generator]:
    """A trainer_state.pt's step and batch-order RNG; KeyError/TypeError/ValueError if damaged. (Files
    written before the history moved to history.jsonl hold it here too; the checkpoint's record is read.)"""
    if not isinstance(state, dict) or not isinstance(state["optimizer"], dict):
        raise TypeError("a dict with an optimizer state was expected")
    step = state["step"]
    if not is_whole(step, 0):
        raise ValueError(f"step {step!r} is damaged")
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(state["np_rng"])
    return step, rng
