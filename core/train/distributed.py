"""Data-parallel training of one adapter on torch.distributed: `torchrun --nproc_per_node N -m core finetune ...`.

Every rank loads the frozen base and the same adapter init; only the LoRA gradients travel. The run's
TrainConfig is the global one: `batch_size` is the total micro-batch of all ranks together, so the
checkpoint format, the learning-rate schedule and the batch order are those of a single process with
the same batch, and a run resumes on any number of ranks that divides its batch size.

- Batches: every rank draws the global micro-batch from the global batch-order RNG exactly as one
  process would (core.train.data.get_batch), then keeps its own disjoint rows (rank r: rows
  r*B/N .. (r+1)*B/N), the DistributedSampler idea on random windows.
- Gradients: after the last micro-batch of a step, one all-reduce of all LoRA gradients (flattened,
  with the step's loss) divided by N. Each rank's gradient is the mean over its B/N rows, so the average
  is the gradient of the mean over all B rows: the single-process gradient up to float rounding. A
  manual all-reduce rather than DDP: the adapter lives inside the shared base (no module of its own
  to wrap), and one reduce per optimizer step is what DDP's no_sync would give with accumulation.
- Rank 0 alone writes checkpoints, the adapter, studio.json and tracker logs, and prints; the others
  are silent. Every rank evaluates the same validation windows (same weights, same result).
- Failure: a collective that fails (a rank died, or nothing came within LORA_STUDIO_DIST_TIMEOUT
  seconds) ends this rank with one line and exit status 1; the last checkpoint is untouched (writes
  are atomic) and `python -m core finetune --resume RUN` continues from it on any number of ranks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from core.train.loop import Hooks, TrainLoop

TIMEOUT_ENV = "LORA_STUDIO_DIST_TIMEOUT"  # seconds a collective waits for the other ranks (default 600)
# "RANK:STEP": that rank exits at once (status 1) before the gradient reduce of optimizer step STEP;
# how the tests kill a rank mid-run at a known point
FAULT_ENV = "LORA_STUDIO_FAULT_EXIT"


class RankLost(RuntimeError):
    """A collective failed: another rank died or timed out."""


def launched() -> bool:
    """True in a process started by torchrun (or torch.distributed.run) with more than one process."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")) and int(os.environ["WORLD_SIZE"]) > 1


class Group(Hooks):
    """This process's place in the run: rank, world size, device, and the collectives the trainer needs; as
    a TrainLoop's hooks, the ranks agree on Stop."""

    def __init__(self, device_pref: str = "auto"):
        self.rank = int(os.environ["RANK"])  # 0 writes files and prints
        self.world = int(os.environ["WORLD_SIZE"])  # processes in the run
        self.local_rank = int(os.environ["LOCAL_RANK"])  # the GPU of this process on its node
        cuda = device_pref.startswith("cuda") or device_pref == "auto" and torch.cuda.is_available()
        if cuda:
            self.device = torch.device("cuda", self.local_rank)  # one GPU per process, whatever was asked
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        self.writes = self.rank == 0  # whether this rank writes checkpoints, the adapter and logs
        if not self.writes:  # one voice: rank 0 prints; errors still reach stderr
            sys.stdout = open(os.devnull, "w")

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global micro-batch of `batch_size` rows."""
        n = batch_size // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise ValueError(f"the batch size ({batch_size}) is the total over all {self.world} processes and must "
                             f"be a multiple of it; choose --batch-size {self.world * max(1, batch_size // self.world)} "
                             f"or run {self.world} processes that divide it.")

    def average(self, params, loss_sum: torch.Tensor, step: int) -> torch.Tensor:
        """Average the gradients of `params` and the step's summed micro-batch loss over the ranks, in one
        all-reduce; returns the averaged loss sum (the global mean loss once divided by grad_accum)."""
        _fault(self.rank, step)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss_sum.reshape(1).to(grads[0].dtype)])
        self._collective(dist.all_reduce, flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        return flat[-1].to(loss_sum.dtype)

    def agree_stop(self, flag: bool) -> bool:
        return self.any(flag)

    @property
    def fatal(self) -> tuple:
        return (RankLost,)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on one of them (Stop: all ranks stop at the same step)."""
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def agree(self, settings: dict) -> None:
        """Refuse to go on unless every rank was started with the same `settings` (name -> JSON-able value):
        ranks that differ would train different runs, or wait on each other until the timeout."""
        ranks = [None] * self.world
        self._collective(dist.all_gather_object, ranks, settings)
        differ = [k for k in sorted(set().union(*ranks)) if any(r.get(k) != ranks[0].get(k) for r in ranks)]
        if differ:
            raise ValueError(f"the processes were started with different settings: "
                             f"{'; '.join(_differences(k, [r.get(k) for r in ranks]) for k in differ)}; "
                             f"start every process with the same flags, data and base.")

    def same(self, what: str, value) -> None:
        """Refuse to go on unless every rank holds the same `value` (e.g. the resumed step and batch order);
        only a digest travels and the message names the ranks, never the value itself."""
        values = [None] * self.world
        self._collective(dist.all_gather_object, values, hashlib.sha256(json.dumps(value).encode()).hexdigest())
        others = [str(i) for i, v in enumerate(values) if v != values[0]]
        if others:
            raise ValueError(f"the processes disagree on {what} (rank {', '.join(others)} differs from rank 0); "
                             f"every node must read the same run folder.")

    def barrier(self) -> None:
        self._collective(dist.barrier)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _collective(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - gloo and NCCL raise various types for a lost peer or a timeout
            raise RankLost(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None


def _differences(name: str, values: list) -> str:
    """'steps (rank 0: 8, rank 1: 9)': one setting's value on rank 0 and on each rank that differs from it."""
    def show(v) -> str:
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."
    shown = [f"rank {i}: {show(v)}" for i, v in enumerate(values) if i == 0 or v != values[0]]
    return f"{name} ({', '.join(shown)})"


def _fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{rank}:{step}":
        sys.stderr.flush()
        os._exit(1)


def train(trainer, group: Group, hold, on_event) -> int:
    """Run `trainer` on this rank to the end; rank 0 holds the run folder (`hold()`, a context manager) and
    passes every event to `on_event`. Exit status 0, or 1 after one line on stderr when a rank was lost."""
    group.check_batch(trainer.tcfg.batch_size)
    if trainer.dist is not group:
        raise ValueError("the trainer was made for another process group (Trainer(dist=group)).")
    try:
        group.barrier()  # every rank has checked the run folder before rank 0 claims it
        with hold() if group.writes else contextlib.nullcontext():
            trainer.setup()
            group.same("the run's step and batch order",
                       (trainer.step, json.dumps(trainer._prepared.rng.bit_generator.state)))
            errors = []

            def emit(ev: dict) -> None:
                if group.writes:
                    on_event(ev)
                if ev["type"] == "error":
                    errors.append(ev["message"])
            loop = TrainLoop(trainer.model, group)  # the one loop, Stop agreed by all ranks
            loop.join(trainer, emit)
            loop.run()
            if errors:  # the other ranks learn of it when their next collective fails
                raise RuntimeError(errors[0])
        group.barrier()  # rank 0's files are complete before any rank reports success
    except RankLost as e:
        ck = trainer._latest_checkpoint()
        print(f"error: rank {group.rank} lost the other processes at step {trainer.step + 1} ({e}); "
              + (f"the last checkpoint {ck} is intact; resume with: python -m core finetune --resume {trainer.out_dir}"
                 if ck else "no checkpoint was saved yet"), file=sys.stderr, flush=True)
        os._exit(1)  # the group is broken: destroying it could wait forever
    group.close()
    return 0


def local_rows(x: torch.Tensor, y: torch.Tensor, group: Group | None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a global micro-batch (all of it without a group)."""
    if group is None:
        return x, y
    s = group.rows(x.shape[0])
    return x[s], y[s]

