"""The headless CLI: prepare -> finetune -> compare -> merge (python -m core <command> --help).

Bad input ends with one line, `error: ...`, on stderr and exit status 2; never a traceback.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

DEFAULT_PROMPTS = ("Once upon a time", "The best thing about today is", "My friend told me that",
                   "In the kitchen", "The meaning of life is")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# ---- shared options -------------------------------------------------------------------

def add_model_options(p, default_note: str):
    from core.model.config import PRESETS
    p.add_argument("--model", default=None,
                   help=f"base model: {', '.join(PRESETS)} (tiny: random, offline) or a hub id ({default_note})")
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="local GPT-2 weights (an HF folder or a .safetensors/.bin/.pt file) instead of the hub")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="the frozen base's dtype: auto (default) is bf16 where the device computes it natively "
                        "(CUDA, CPUs with AVX-512 BF16/AMX, Apple M2+), else fp32; LoRA stays fp32")
    p.add_argument("--library", default="adapters", metavar="DIR",
                   help="the adapter library folder (default: ./adapters)")


def load_model(args, recorded: str | None = None, fallback: str = "gpt2", *, engine):
    """`engine`'s base from --weights/--model (checked against each other), else the adapter's (or the
    resumed run's) recorded base when that is a known GPT-2 preset."""
    from core.model.config import PRESETS
    from core.model.weights import WeightsError, check_preset_shape
    if args.weights and not Path(args.weights).expanduser().exists():
        raise WeightsError(f"--weights {args.weights}: no such file or folder.")
    source = args.weights or args.model or _known_base(recorded) or fallback
    base_id = str(Path(args.weights).expanduser().resolve()) if args.weights else source
    say(f"loading base model {source} ...")
    progress = lambda m: say("  " + m)  # noqa: E731
    model = engine.base(base_id, weights=args.weights, progress=progress)
    if args.weights and args.model in PRESETS:
        check_preset_shape(model.config, args.model, args.weights, "drop --model or pass matching weights")
    c = model.config
    say(f"base model: {base_id} ({c.n_layer} layers, width {c.n_embd}, {c.n_params() / 1e6:.1f}M parameters) "
        f"on {model.device}, {str(model.dtype).replace('torch.', '')}")
    if source == "tiny":
        say("note: 'tiny' has random weights: its text is noise until trained.")
    return model, base_id


def _dtype(args):
    """--precision as the base's dtype on --device. merge's auto is fp32: an export carries the base's
    weights as published, not rounded to bf16 (asking for bf16 still gets it)."""
    from core.device import pick_device, precision_dtype
    precision = getattr(args, "precision", "auto")
    if precision == "auto" and getattr(args, "command", None) == "merge":
        precision = "fp32"
    return precision_dtype(precision, pick_device(args.device))


def _known_base(recorded: str | None) -> str | None:
    """The preset an adapter's recorded base names ('openai-community/gpt2' -> 'gpt2'). Anything else
    is refused: an adapter's files may come from anyone, and must not choose what is downloaded
    (a hub id) or read (a local path) as the base."""
    from core.adapters.validate import preset_of
    from core.model.config import PRESETS
    if recorded is None or preset_of(recorded):
        return preset_of(recorded)
    raise ValueError(f"the adapter names its base {recorded!r}, which is not one of the known GPT-2 models "
                     f"({', '.join(PRESETS)}); pass --model or --weights to choose the base yourself.")


def say(msg: str = "") -> None:
    print(msg, flush=True)


# ---- prepare --------------------------------------------------------------------------

def cmd_prepare(args) -> int:
    import numpy as np
    from core.train.data import prepare, top_tokens
    if args.prompt_field or args.response_field or args.text_field or args.template:
        return _prepare_records(args)  # .jsonl/.json/.csv/.tsv: core.train.instruct
    ds = prepare(args.input, args.output, args.train_ratio)
    m = ds.meta
    say(f"read {len(args.input)} file(s): {', '.join(m['sources'])}")
    say(f"characters: {m['chars']:,}")
    say(f"tokens: {m['tokens']:,} ({m['unique_tokens']:,} unique, "
        f"{m['tokens'] / max(1, m['chars']):.3f} per character)")
    say(f"split: {m['train_tokens']:,} train / {m['val_tokens']:,} val (ratio {args.train_ratio})")
    if len(ds.train) < 129:
        say(f"note: the training split is shorter than the default block of 128 + 1 tokens; "
            f"finetune will reduce the block size to {len(ds.train) - 1}.")
    top = top_tokens(np.concatenate([ds.train, ds.val]), 10)
    say("most frequent tokens: " + ", ".join(f"{s!r} x{n}" for _, s, n in top))
    say(f"wrote {args.output}/train_00000.npy, val_00000.npy, meta.json")
    return 0


# ---- finetune -------------------------------------------------------------------------

RESUME_FIXED = ("rank", "alpha", "targets", "dropout", "dora", "lr", "batch_size", "seq_len", "grad_accum", "seed",
                "warmup", "output", "rslora", "init", "loraplus_lr_ratio", "rank_pattern", "alpha_pattern")


def cmd_finetune(args) -> int:
    """A solo job on a fresh Engine, through the studio's job system (core.train.runs.Runs); under torchrun,
    this process's rank of a data-parallel run on the same engine's base."""
    from core.adapters.library import check_name
    from core.train.data import load_dataset
    from core.train.estimate import parse_size
    resume, data, lcfg, tcfg = _finetune_settings(args)
    if args.max_train_memory is not None:  # a bad size is refused before a model loads
        args.max_train_memory = parse_size(args.max_train_memory)
    dataset = load_dataset(data)
    from core.train import distributed  # under torchrun: join the other processes before the base loads
    args.group = distributed.Group(args.device) if distributed.launched() else None
    if args.group:
        args.device = str(args.group.device)
        try:  # before the base loads; first the settings, so that every rank refuses alike
            args.group.agree(_rank_settings(args, dataset, lcfg, tcfg, resume))
            args.group.check_batch(tcfg.batch_size)
        except ValueError:
            args.group.close()  # every rank refuses here: leave the group cleanly (an open gloo group aborts)
            raise
    if resume:
        name, out_dir = resume.name, resume.path.parent.parent
    else:
        name, out_dir = _run_folder(args.output, dataset.name, args.library, check_name)
    engine = _engine(args)
    try:
        return _finetune(args, engine, dataset, lcfg, tcfg, name, out_dir, resume)
    finally:
        engine.close()


# settings whose flag is not the field's name with dashes (the others: --steps, --lr, --seed, ...)
FLAG_OF = {"r": "rank", "warmup_steps": "warmup", "sample_prompts": "sample-prompt", "use_dora": "dora",
           "use_rslora": "rslora"}
NO_FLAG = ("min_lr_ratio", "grad_clip", "weight_decay", "eval_max_batches", "keep_checkpoints", "sample_tokens",
           "cuda_graphs")  # settings finetune has no flag for (a resumed checkpoint's may still differ)


def _rank_settings(args, dataset, lcfg, tcfg, resume) -> dict:
    """What every torchrun process must agree on, by flag name: the whole run's settings, the data's
    digest, the base (as asked for) and the resumed checkpoint. --data's path may differ between nodes."""
    fields = {**tcfg.to_dict(), **lcfg.to_dict()}
    named = {k.replace("_", " ") if k in NO_FLAG else "--" + FLAG_OF.get(k, k).replace("_", "-"): v
             for k, v in fields.items()}
    return {**named, "the dataset's content": dataset.sha256,
            "the base (--model/--weights)": args.weights or args.model or (resume.meta.get("base_model") if resume
                                                                          else None),
            "--precision": args.precision, "--quantize": args.quantize, "--checkpointing": bool(args.checkpointing),
            "the resumed checkpoint": resume.step if resume else None}


def _finetune_settings(args):
    """(resume checkpoint or None, dataset folder, LoraConfig, TrainConfig) from the arguments."""
    from core.lora.config import LoraConfig, normalize_targets
    from core.train.config import TrainConfig
    from core.train.runs import resumed_config
    from core.train.trainer import find_checkpoint
    resume = find_checkpoint(_resume_path(args.resume, args.library)) if args.resume else None
    if resume:
        given = [o for o in RESUME_FIXED if getattr(args, o) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} cannot be changed when resuming; the run's "
                             f"settings are kept (only --steps may grow).")
        data = args.data or resume.meta.get("dataset", {}).get("path")
        if not data:
            raise ValueError("pass --data: the checkpoint does not record where its dataset is.")
        tcfg, lcfg = resumed_config(resume, args.steps, **_runtime(args)), resume.lcfg
    else:
        if not args.data:
            raise ValueError("pass --data DIR (a folder made by `python -m core prepare`).")
        data = args.data
        d = TrainConfig()
        tcfg = TrainConfig(steps=_pick(args.steps, d.steps), lr=_pick(args.lr, d.lr),
                           warmup_steps=args.warmup, batch_size=_pick(args.batch_size, d.batch_size),
                           seq_len=_pick(args.seq_len, d.seq_len), grad_accum=_pick(args.grad_accum, d.grad_accum),
                           eval_interval=args.eval_interval, checkpoint_interval=args.checkpoint_interval,
                           sample_prompts=tuple(args.sample_prompt or ()), seed=_pick(args.seed, d.seed),
                           **_runtime(args))
        lcfg = LoraConfig(r=_pick(args.rank, 8), alpha=float(_pick(args.alpha, 16.0)),
                          dropout=_pick(args.dropout, 0.0), use_dora=bool(args.dora),
                          targets=normalize_targets(args.targets) if args.targets else LoraConfig().targets,
                          **_variant_options(args))
        tcfg.validate()
        lcfg.validate()
    return resume, data, lcfg, tcfg


def _variant_options(args) -> dict:
    """The LoRA-variant flags as LoraConfig fields (patterns are JSON objects; checked by LoraConfig)."""
    from core.lora.patterns import parse_pattern
    return {"use_rslora": bool(args.rslora), "init": args.init or "kaiming",
            "loraplus_lr_ratio": 1.0 if args.loraplus_lr_ratio is None else args.loraplus_lr_ratio,
            "rank_pattern": parse_pattern(args.rank_pattern, "--rank-pattern"),
            "alpha_pattern": parse_pattern(args.alpha_pattern, "--alpha-pattern")}


def _runtime(args) -> dict:
    """The flags that change how a step runs, not what it computes (a resumed run may change them)."""
    return {"cuda_graphs": False} if args.no_cuda_graphs else {}


def _finetune(args, engine, dataset, lcfg, tcfg, name: str, out_dir: Path, resume) -> int:
    model, base_id = load_model(args, resume.meta.get("base_model") if resume else None, engine=engine)
    if args.quantize:  # the fresh engine's base, before any job trains on it
        from core.model.quant import quantize_base
        quantize_base(model, args.quantize)
        say(f"frozen base quantized to {args.quantize} (LoRA stays in full precision)")
    model.checkpointing = bool(args.checkpointing)
    if args.group:  # torchrun: not a job of the in-process scheduler, but this process's rank of the run
        from core.train.runs import hold_run_folder, run_meta
        from core.train.trackers import make_trackers
        from core.train.trainer import Trainer
        trainer = Trainer(model, dataset, lcfg, tcfg, name, out_dir, base_id=base_id, resume=resume,
                          max_memory=engine.max_train_memory, meta=run_meta(engine, name, resume=resume),
                          dist=args.group)
        _describe(trainer, resume)
        args.trackers = make_trackers(args.report_to if args.group.writes else None, out_dir)
        return _train_distributed(args, trainer, lambda: hold_run_folder(engine, out_dir, new=resume is None))
    return _train(args, engine, dataset, lcfg, tcfg, name, out_dir, resume, base_id)


def _describe(trainer, resume) -> None:
    """What the run will do, as its trainer was built: data, LoRA, steps and batch, and where it is saved."""
    from core.lora import variants
    lcfg, tcfg, ds = trainer.lcfg, trainer.tcfg, trainer.dataset
    say(f"data: {ds.path} ({len(ds.train):,} train / {len(ds.val):,} val tokens)")
    say(f"{variants.of(lcfg).label}: rank {lcfg.r}, alpha {lcfg.alpha:g}, targets {', '.join(lcfg.targets)}")
    say(f"training: {tcfg.steps} steps, lr {tcfg.lr:g}, batch {tcfg.batch_size} x seq {trainer.seq_len} x "
        f"{tcfg.grad_accum} accumulation = {tcfg.batch_size * tcfg.grad_accum} sequences per step, seed {tcfg.seed}")
    say(f"run folder: {trainer.out_dir}" + (f" (resuming from {resume.path.name})" if resume else ""))


def _train(args, engine, dataset, lcfg, tcfg, name: str, out_dir: Path, resume, base_id: str) -> int:
    """The run as the one job of the engine's Runs (the studio's path, with no one else to co-batch with),
    built now so bad settings are refused before its folder is made; its events printed as they come.
    Ctrl-C stops after the current step and saves; twice, quits at once."""
    import queue
    from core.train.runs import Runs
    from core.train.trainer import TrainingError
    events: queue.Queue = queue.Queue()
    runs = Runs(engine, solo=True)
    try:
        kw = {"report_to": args.report_to, "weights": args.weights, "listener": events.put}
        job = (runs.resume(base_id, dataset, name, args.steps, checkpoint=resume, **_runtime(args), **kw) if resume
               else runs.start(base_id, dataset, name, lcfg, tcfg, out_dir=out_dir, **kw))
        _describe(job.spec.trainer, resume)
        stop, bar = threading.Event(), ProgressBar(sys.stderr)
        _on_sigint(stop)
        while True:
            if stop.is_set() and not job.stop_flag.is_set():
                runs.stop(job.id)
            try:
                ev = events.get(timeout=0.2)
            except queue.Empty:
                continue
            if ev["type"] == "error":
                bar.clear()
                raise TrainingError(ev["message"])
            _print_event(ev, bar, args.log_interval)
            if ev["type"] == "done":
                return 0
    except KeyboardInterrupt:  # Ctrl-C twice: quit now, without saving (the step in progress is not waited for)
        print("quit without saving.", file=sys.stderr, flush=True)
        os._exit(130)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        runs.close()


def _train_distributed(args, trainer, hold) -> int:
    """torchrun: this process's rank of a data-parallel run (core.train.distributed). Rank 0 holds the run
    folder, prints the events and logs them to the trackers; Ctrl-C stops every rank after the same step."""
    from core.train.distributed import train
    bar = ProgressBar(sys.stderr)

    def on_event(ev: dict) -> None:
        for tracker in args.trackers:
            tracker(ev)
        if ev["type"] != "error":  # an error ends the run with its one line (main)
            _print_event(ev, bar, args.log_interval)
    _on_sigint(trainer.stop)
    return train(trainer, args.group, hold, on_event)


def _print_event(ev: dict, bar: "ProgressBar", log_interval: int) -> None:
    """One line (or none) for a trainer event; step lines every log_interval steps, a bar between."""
    t = ev["type"]
    if t == "start":
        say(f"trainable parameters: {ev['trainable_params']:,} | device {ev['device']}"
            + (" | bf16 autocast" if ev["autocast"] else ""))
    elif t == "info":
        bar.clear()
        say(f"note: {ev['message']}")
    elif t == "step":
        if ev["step"] % log_interval == 0 or ev["step"] in (1, ev["steps"]):
            bar.clear()
            say(f"step {ev['step']:5d} | loss {ev['loss']:.6f} | lr {ev['lr']:.4e} | "
                f"norm {ev['grad_norm']:.4f} | dt {ev['step_time'] * 1000:.2f}ms | "
                f"tok/sec {ev['tokens_per_sec']:.2f} | {ev['step'] / ev['steps']:4.0%} ETA {_dur(ev['eta'])}")
        bar.draw(ev["step"], ev["steps"], ev["eta"])
    elif t == "eval":
        bar.clear()
        say(f"step {ev['step']:5d} | val loss {ev['val_loss']:.4f} | val ppl {ev['val_ppl']:.2f}")
    elif t == "sample":
        for s in ev["samples"]:
            say(f"  sample | {s['prompt']!r} -> {s['text']!r}")
    elif t == "checkpoint":
        say(f"checkpoint: {ev['path']}")
    elif t == "done":
        bar.clear()
        val = f", val loss {ev['val_loss']:.4f}" if ev["val_loss"] is not None else ""
        say(f"{ev['status']} after {ev['step']} steps in {_dur(ev['elapsed'])}{val}")
        say(f"adapter: {ev['path']}")
        say(f"resume point: {ev['checkpoint']}")
        if ev["status"] == "stopped":
            say(f"continue with: python -m core finetune --resume {ev['path']}")


def _pick(value, default):
    return default if value is None else value


def _resume_path(spec: str, library: str) -> Path:
    """A run/checkpoint folder path, or a library name: NAME or NAME@step_000050 (an existing path wins:
    a run folder may hold only checkpoints, which is no adapter to resolve)."""
    from core.adapters.resolve import library_entry
    p = Path(spec).expanduser()
    return p if p.exists() else library_entry(spec, library) or p


def _run_folder(output: str | None, data_name: str, library: str, check_name) -> tuple[str, Path]:
    """--output NAME -> <library>/NAME; --output PATH (with a slash) -> that folder; default a new name."""
    if output and ("/" in output or "\\" in output):
        path = Path(output).expanduser()
        return check_name(path.name), path
    if output:
        return check_name(output), Path(library) / output
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", data_name).lstrip("._-")[:40] or "run"
    name = f"{base}-{time.strftime('%Y%m%d-%H%M%S')}"
    return check_name(name), Path(library) / name


def _on_sigint(stop: threading.Event):
    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping after the current step and saving (Ctrl-C again to quit without saving) ...",
              file=sys.stderr, flush=True)
    signal.signal(signal.SIGINT, handler)


def _dur(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressBar:
    """A one-line text bar redrawn in place on a terminal; silent when output is a file or pipe."""

    def __init__(self, stream, width: int = 30):
        self.stream, self.width, self.shown = stream, width, False
        self.live = hasattr(stream, "isatty") and stream.isatty()

    def draw(self, step: int, steps: int, eta: float) -> None:
        if not self.live:
            return
        done = int(self.width * step / steps)
        self.stream.write(f"\r[{'#' * done}{'.' * (self.width - done)}] {step}/{steps} "
                          f"{step / steps:4.0%} ETA {_dur(eta)}  ")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * (self.width + 40) + "\r")
            self.stream.flush()
            self.shown = False


# ---- compare --------------------------------------------------------------------------

def cmd_compare(args) -> int:
    """Base and adapters continue the same prompts in one batch per sample, through the Engine and its
    decode scheduler, as in the studio's Compare tab."""
    engine = _engine(args, len(args.lora))
    try:
        return _compare(args, engine)
    finally:
        # the scheduler's loop thread is stopped and joined before the interpreter shuts down: killed
        # inside a torch call, it aborts the process ("terminate called without an active exception")
        engine.close()


def _compare(args, engine) -> int:
    from core.generate.sampling import SamplingConfig
    refs = [engine.resolve(spec) for spec in args.lora]
    load_model(args, _recorded_base(refs[0].path), engine=engine)
    names, titles = [], []
    for ref in refs:
        names.append(engine.load(ref))
        titles.append(_unique(_display_name(ref.path), titles))
    prompts = args.prompts or list(DEFAULT_PROMPTS)
    columns = ["base"] + titles
    width = max(24, (shutil.get_terminal_size((120, 24)).columns - 3 * (len(columns) - 1)) // len(columns))
    for i in range(args.samples):
        prompt = prompts[i % len(prompts)]
        cfg = SamplingConfig(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             seed=args.seed + i)
        texts = []
        for texts in engine.compare(prompt, [None] + names, cfg, every=3600.0):
            pass  # the final texts come at once, whatever `every`: the whole continuations
        say(f"=== sample {i + 1}/{args.samples} | seed {cfg.seed} | prompt: {prompt!r} ===")
        say(_side_by_side(columns, [prompt + t for t in texts], width))
        say()
    return 0


def _engine(args, adapters: int = 1):
    """The fresh Engine of one command: finetune's solo job trains on its base (--max-train-memory caps it);
    for compare, merge and eval it is the studio's one path from an adapter reference to a loaded adapter,
    keeping every adapter of the command loaded (none evicted). It creates no library folder until one is
    used. Compare generates through its decode scheduler (the caller closes the engine)."""
    from core.engine import Engine
    # max_new_tokens: a server's cap on requests; here the user's own --max-tokens is the cap (finetune and
    # merge generate none)
    return Engine(args.device, args.library, _dtype(args), max_loaded=max(16, adapters),
                  max_new_tokens=max(1, getattr(args, "max_tokens", 1)),
                  max_train_memory=getattr(args, "max_train_memory", None))


def _recorded_base(src: Path) -> str | None:
    """The base an adapter says it was made for (core.adapters.library.recorded_base), cut short."""
    from core.adapters.library import recorded_base
    base = recorded_base(src if src.is_dir() else src.parent)
    return base[:200] if base else None


def _display_name(src: Path) -> str:
    """The adapter's name, or run@step_NNNNNN for a training checkpoint (core.adapters.resolve.display_name)."""
    from core.adapters.resolve import display_name
    return display_name(src) or "adapter"


def _unique(name: str, taken: list[str]) -> str:
    out, k = name, 2
    while out in taken or out == "base":
        out, k = f"{name}-{k}", k + 1
    return out


def _side_by_side(titles: list[str], texts: list[str], width: int) -> str:
    cols = []
    for title, text in zip(titles, texts):
        lines = [title[:width], "-" * min(width, max(len(title), 8))]
        for para in text.splitlines() or [""]:
            lines += textwrap.wrap(para, width) or [""]
        cols.append(lines)
    height = max(len(c) for c in cols)
    rows = []
    for r in range(height):
        rows.append(" | ".join((c[r] if r < len(c) else "").ljust(width) for c in cols).rstrip())
    return "\n".join(rows)


# ---- merge ----------------------------------------------------------------------------

def cmd_merge(args) -> int:
    if not args.output and not args.gguf and not args.gguf_adapter:
        raise ValueError("pass --output DIR (a transformers folder), --gguf FILE or --gguf-adapter FILE (for "
                         "llama.cpp), or several.")
    if args.gguf or args.gguf_adapter:
        from core.adapters.gguf_export import load_gguf
        load_gguf()  # a missing package is refused before a model loads
    engine = _engine(args)
    ref = engine.resolve(args.lora)
    _, base_id = load_model(args, _recorded_base(ref.path), engine=engine)
    name = engine.load(ref)
    lcfg = engine.config_of(name)
    if args.gguf_adapter:  # first: what it refuses (DoRA) is refused before anything is written
        out = engine.export_gguf_adapter(name, args.gguf_adapter)
        say(f"wrote {out} (GGUF adapter, F32: load it with llama.cpp's --lora over a GGUF of {base_id})")
    if args.output or args.gguf:
        say(f"merged {args.lora} (rank {lcfg.r}, {', '.join(lcfg.targets)}) into {base_id}")
    if args.output:
        out = engine.export_merged(name, args.output)
        say(f"wrote {out}/config.json, model.safetensors (load with transformers.GPT2LMHeadModel.from_pretrained)")
    if args.gguf:
        out = engine.export_gguf(name, args.gguf, args.type)
        say(f"wrote {out} (GGUF, {args.type}, llama.cpp's GPT-2 layout)")
    return 0


# ---- eval -----------------------------------------------------------------------------

def cmd_eval(args) -> int:
    """The base and each adapter scored on one dataset split in one batched pass (core Engine.evaluate):
    a table of loss, perplexity, tokens and seconds, or with --json one JSON object on stdout."""
    import contextlib
    import json
    from core.train.data import load_dataset
    from core.train.evaluate import MAX_MODELS
    if len(args.lora) > MAX_MODELS - 1:
        raise ValueError(f"--lora takes at most {MAX_MODELS - 1} adapters (got {len(args.lora)}).")
    dataset = load_dataset(args.data)
    ids = dataset.val if args.split == "val" else dataset.train
    if len(ids) < 2:
        other = "train" if args.split == "val" else "val"
        raise ValueError(f"the {args.split} split of {args.data} holds {len(ids)} tokens, too few to evaluate; "
                         f"use --split {other} or prepare more text.")
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():  # stdout: JSON only
        engine = _engine(args, len(args.lora))
        refs = [engine.resolve(spec) for spec in args.lora]
        _, base_id = load_model(args, _recorded_base(refs[0].path) if refs else None, engine=engine)
        names, titles = [], []
        for ref in refs:
            names.append(engine.load(ref))
            titles.append(_unique(_display_name(ref.path), titles))
    mask = dataset.val_mask if args.split == "val" else dataset.train_mask  # instruction data: responses only
    ev = engine.evaluate(ids, [None] + names, args.seq_len, args.max_tokens, mask=mask)
    rows = [{"model": title, "adapter": spec, "loss": s.loss, "ppl": s.ppl, "tokens": s.tokens,
             "seconds": ev.seconds} for title, spec, s in zip(["base"] + titles, [None] + args.lora, ev.scores)]
    if args.json:
        print(json.dumps({"data": str(args.data), "split": args.split, "base_model": base_id, "seq_len": ev.seq_len,
                          "windows": ev.windows, "tokens": ev.tokens, "seconds": ev.seconds, "models": rows}))
        return 0
    width = max(8, *(len(r["model"]) for r in rows))
    say(f"{'model':<{width}}  {'loss':>8}  {'ppl':>10}  {'tokens':>8}  {'seconds':>8}")
    for r in rows:
        say(f"{r['model']:<{width}}  {r['loss']:8.4f}  {r['ppl']:10.2f}  {r['tokens']:8,}  {r['seconds']:8.2f}")
    say(f"{len(rows)} model(s) in one batched pass: {ev.windows} window(s) of up to {ev.seq_len} tokens from the "
        f"{args.split} split, {ev.forwards} forward(s), {ev.seconds:.2f} s in all (the time is shared).")
    return 0


# ---- the parser -----------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m core", description="LoRA Studio headless: prepare -> finetune -> compare -> merge.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_prepare(sub)
    _add_finetune(sub)
    _add_compare(sub)
    _add_merge(sub)
    _add_eval(sub)
    return p


def _prepare_records(args) -> int:
    """prepare --input data.jsonl --prompt-field q --response-field a [--template FILE] | --text-field t."""
    from core.train.imports import Fields
    from core.train.instruct import prepare_records, read_template
    if len(args.input) != 1:
        raise ValueError("with --prompt-field/--response-field/--text-field give one --input file "
                         "(.jsonl, .json, .csv or .tsv).")
    fields = Fields(text=args.text_field, prompt=args.prompt_field, response=args.response_field)
    template = read_template(args.template) if args.template else None
    ds = prepare_records(args.input[0], fields, args.output, template, args.train_ratio)
    m = ds.meta
    if fields.instruction:
        say(f"read {m['records']:,} examples from {args.input[0]} ({m['train_records']:,} train / "
            f"{m['val_records']:,} val)")
        say(f"template: {m['template']!r}")
        say(f"tokens: {m['tokens']:,} ({m['response_tokens']:,} response tokens in the loss; prompts masked)")
        say(f"wrote {args.output}/train_00000.npy, val_00000.npy, train_mask_00000.npy, val_mask_00000.npy, "
            f"meta.json")
    else:
        say(f"read {len(m['sources'])} record(s) of field '{args.text_field}': {m['tokens']:,} tokens, split "
            f"{m['train_tokens']:,} train / {m['val_tokens']:,} val")
        say(f"wrote {args.output}/train_00000.npy, val_00000.npy, meta.json")
    return 0


def _add_prepare(sub) -> None:
    s = sub.add_parser("prepare", help="text files -> a tokenized train/val dataset folder",
                       description="Tokenize .txt/.md files (GPT-2 BPE), join them with <|endoftext|>, split "
                                   "train/val and write train_00000.npy, val_00000.npy and meta.json.")
    s.add_argument("--input", nargs="+", required=True, metavar="FILE", help="one or more UTF-8 .txt/.md files, or one .jsonl/.json/.csv/.tsv file with --prompt-field/--response-field or --text-field")
    s.add_argument("--output", required=True, metavar="DIR", help="the dataset folder to write")
    s.add_argument("--train-ratio", type=float, default=0.9, help="share of tokens for training (default 0.9)")
    s.add_argument("--prompt-field", metavar="F", help="instruction data (.jsonl/.json/.csv/.tsv): the prompt's "
                                                        "field or column (no loss on its tokens)")
    s.add_argument("--response-field", metavar="F", help="... and the response's field (the loss is on these)")
    s.add_argument("--text-field", metavar="F", help="plain text from records: each record's field F is a document")
    s.add_argument("--template", metavar="FILE", help="a template file with {prompt} and {response} (default: "
                                                      "'### Instruction:\\n{prompt}\\n\\n### Response:\\n{response}')")
    s.set_defaults(func=cmd_prepare)


def _add_finetune(sub) -> None:
    s = sub.add_parser("finetune", help="train a LoRA adapter on a prepared dataset",
                       description="Train a LoRA adapter. The adapter is saved in the library as "
                                   "<library>/<name>/ with checkpoints in <name>/checkpoints/step_NNNNNN/. "
                                   "Ctrl-C stops after the current step and saves; --resume continues.")
    s.add_argument("--data", metavar="DIR", help="a dataset folder from `prepare` (or the seed's layout)")
    add_model_options(s, "default gpt2")
    s.add_argument("--steps", type=int, help="optimizer steps (default 500)")
    s.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    s.add_argument("--alpha", type=float, help="LoRA alpha; the update is scaled by alpha/rank (default 16)")
    s.add_argument("--dropout", type=float, help="LoRA dropout (default 0)")
    s.add_argument("--dora", action="store_true", default=None,
                   help="DoRA: also train a magnitude per output feature; often closer to full fine-tuning at low "
                        "rank, for a slower step and more activation memory (default off)")
    s.add_argument("--rslora", action="store_const", const=True,
                   help="rsLoRA: scale by alpha/sqrt(rank), so high ranks (64+) still learn")
    s.add_argument("--init", choices=("kaiming", "gaussian", "pissa", "olora"),
                   help="how A and B start (default kaiming, PEFT's default); pissa/olora start from the base's "
                        "principal directions (faster early progress) and save a plain LoRA of twice the rank")
    s.add_argument("--loraplus-lr-ratio", type=float, metavar="RATIO",
                   help="LoRA+: B learns RATIO x faster than A (16 is the paper's choice; default 1, off)")
    s.add_argument("--rank-pattern", metavar="JSON",
                   help="per-module ranks as PEFT's rank_pattern, e.g. '{\"h.0.attn.c_attn\": 4}'")
    s.add_argument("--alpha-pattern", metavar="JSON", help="per-module alphas as PEFT's alpha_pattern (JSON)")
    s.add_argument("--targets", help="comma-separated projections: c_attn, c_proj, c_fc, mlp.c_proj, attn.c_proj "
                                     "(default c_attn)")
    s.add_argument("--lr", type=float, help="peak learning rate (default 3e-4)")
    s.add_argument("--warmup", type=int, help="warmup steps (default 10%% of steps, at most 50)")
    s.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 4)")
    s.add_argument("--seq-len", type=int, help="tokens per sequence (default 128)")
    s.add_argument("--grad-accum", type=int, help="micro-batches per step (default 4)")
    s.add_argument("--eval-interval", type=int, default=50, help="validation every N steps (default 50)")
    s.add_argument("--checkpoint-interval", type=int, default=50, help="checkpoint every N steps (default 50)")
    s.add_argument("--sample-prompt", action="append", metavar="TEXT",
                   help="a prompt to continue at each validation (repeatable)")
    s.add_argument("--log-interval", type=int, default=10, help="print a step line every N steps (default 10)")
    s.add_argument("--seed", type=int, help="seed for the adapter init and batch order (default 1337)")
    s.add_argument("--output", metavar="NAME|DIR",
                   help="run name, saved as <library>/NAME; a path with a slash saves there instead "
                        "(default <dataset>-<date>-<time>)")
    s.add_argument("--resume", metavar="CKPT", help="continue a run: its folder, a checkpoint folder, or a "
                                                    "library name (NAME or NAME@step_000050)")
    s.add_argument("--quantize", choices=("int8", "nf4"),
                   help="store the frozen base in 8 or 4 bits (QLoRA): gpt2-xl trains in under 2 GB with "
                        "--checkpointing")
    s.add_argument("--checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, more time")
    s.add_argument("--max-train-memory", metavar="SIZE",
                   help="refuse settings whose estimated peak memory exceeds SIZE, e.g. 8GB (default: the memory "
                        "available on the device)")
    from core.train.trackers import REPORT_TO
    s.add_argument("--report-to", choices=REPORT_TO, default="none",
                   help="log the run's metrics to a tracker: tensorboard writes <run>/tensorboard/, wandb an "
                        "offline run in <run>/wandb/, trackio a local database in TRACKIO_DIR (default "
                        "<library>/.trackio/); each needs its package (pip install NAME); default none")
    s.add_argument("--no-cuda-graphs", action="store_true",
                   help="on GPUs, run each step eagerly instead of replaying it as a CUDA graph")
    s.set_defaults(func=cmd_finetune)


def _add_compare(sub) -> None:
    s = sub.add_parser("compare", help="base vs adapters on the same prompts and seed, side by side",
                       description="Generate with the base model and each adapter in one batch per sample, "
                                   "same prompt and seed, printed side by side.")
    s.add_argument("--lora", action="append", required=True, metavar="PATH",
                   help="an adapter: library name, NAME@step_000050, folder or .safetensors (repeatable)")
    add_model_options(s, "default: the base recorded with the first adapter")
    s.add_argument("--prompts", nargs="+", metavar="TEXT", help="prompts, used in turn by the samples")
    s.add_argument("--samples", type=int, default=5, help="number of samples (default 5)")
    s.add_argument("--max-tokens", type=int, default=50, help="new tokens per sample (default 50)")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy (default 0.8)")
    s.add_argument("--top-k", type=int, default=50, help="top-k sampling, 0 = off (default 50)")
    s.add_argument("--seed", type=int, default=1234, help="seed of the first sample (default 1234)")
    s.set_defaults(func=cmd_compare)


def _add_merge(sub) -> None:
    s = sub.add_parser("merge", help="fold an adapter into the base and export an HF-format model folder or GGUF",
                       description="Write base + adapter as an HF GPT2LMHeadModel folder "
                                   "(config.json + model.safetensors) and/or a GGUF file for llama.cpp, "
                                   "and/or the adapter alone as a GGUF adapter file for llama.cpp's --lora.")
    s.add_argument("--lora", required=True, metavar="PATH", help="an adapter: library name, folder or .safetensors")
    s.add_argument("--output", metavar="DIR", help="the new model folder (must not exist)")
    s.add_argument("--gguf", metavar="FILE", help="also (or only) write a GGUF file for llama.cpp (must not exist; "
                                                  "pip install gguf)")
    s.add_argument("--gguf-adapter", metavar="FILE",
                   help="also (or only) write the adapter alone, unmerged, as a GGUF adapter file for llama.cpp's "
                        "--lora, to load over a GPT-2 GGUF of the same base (must not exist; F32; not for DoRA)")
    s.add_argument("--type", choices=("f16", "q8_0"), default="f16",
                   help="--gguf's weight type: f16 (default) or q8_0 (8-bit, about half the size)")
    add_model_options(s, "default: the base recorded with the adapter")
    s.set_defaults(func=cmd_merge)


def _add_eval(sub) -> None:
    from core.train.evaluate import EVAL_TOKENS
    s = sub.add_parser("eval", help="loss and perplexity of the base and adapters on a dataset split",
                       description="Score the base model and each adapter on the same windows of a dataset split, "
                                   "all in one batched pass (each window once per model), and print loss, "
                                   "perplexity, tokens and seconds.")
    s.add_argument("--data", required=True, metavar="DIR", help="a dataset folder from `prepare` (or the seed's layout)")
    s.add_argument("--lora", nargs="+", default=[], metavar="PATH",
                   help="up to 8 adapters: library names, NAME@step_000050, folders or .safetensors files")
    s.add_argument("--split", choices=("val", "train"), default="val", help="the split to score (default val)")
    add_model_options(s, "default: the base recorded with the first adapter")
    s.add_argument("--seq-len", type=int, default=128, help="tokens of context per window (default 128)")
    s.add_argument("--max-tokens", type=int, default=EVAL_TOKENS,
                   help=f"tokens scored per model at most, an even sample of the split (default and limit {EVAL_TOKENS})")
    s.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of the table")
    s.set_defaults(func=cmd_eval)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from core.model.tokenizer import TokenizerFileError
    from core.train.trainer import TrainingError
    from core.model.weights import WeightsError
    try:
        if args.command == "compare" and args.samples < 1:
            raise ValueError(f"--samples must be at least 1 (got {args.samples}).")
        return args.func(args)
    except (ValueError, KeyError, OSError, WeightsError, TrainingError, TokenizerFileError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
            msg = f"{e.filename}: {e.strerror}"
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
