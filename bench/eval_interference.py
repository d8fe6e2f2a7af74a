"""How much one user's evaluation slows everyone's Compare: a short compare's latency idle, then while another
thread evaluates 9 models (the base + 8 adapters) at context 1024 over 32K tokens, on one Engine.

    python bench/eval_interference.py [--model tiny] [--tokens 16] [--eval-tokens 32768] [--repeats 5]

Prints both medians and their ratio (issue 28's goal: at most 3x on a CPU), and how long the evaluation took.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.engine import Engine  # noqa: E402
from core.generate.sampling import SamplingConfig  # noqa: E402
from core.lora.layers import add_adapter, lora_parameters  # noqa: E402
from core.lora.config import LoraConfig


def make_library(engine: Engine, base: str, n: int) -> list[str]:
    model = engine.base(base)
    names = []
    for i in range(n):
        name = f"bench-{i}"
        add_adapter(model, name, LoraConfig(r=8, alpha=16.0), seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in lora_parameters(model, name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        engine.library.save(model, name, name, LoraConfig(r=8, alpha=16.0), base)
        names.append(name)
    from core.lora.layers import remove_adapter
    for name in names:
        remove_adapter(model, name)
    return names


def compare_once(engine: Engine, tokens: int) -> float:
    cfg = SamplingConfig(max_new_tokens=tokens, temperature=0.0, seed=1)
    start = time.perf_counter()
    for _ in engine.compare("Once upon a time", [None], cfg, user="bench"):
        pass
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", type=int, default=16, help="new tokens per compare")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine("cpu", library_dir=Path(tmp) / "lib")
        adapters = make_library(engine, args.model, 8)
        compare_once(engine, args.tokens)  # warm-up: the scheduler's thread, the adapters' first load
        idle = statistics.median(compare_once(engine, args.tokens) for _ in range(args.repeats))
        ids = np.random.default_rng(0).integers(0, 50256, args.eval_tokens + 1)
        done, eval_s = threading.Event(), []

        def evaluate():
            t = time.perf_counter()
            engine.evaluate(ids, [None, *adapters], seq_len=args.seq_len, max_tokens=args.eval_tokens)
            eval_s.append(time.perf_counter() - t)
            done.set()

        threading.Thread(target=evaluate, daemon=True).start()
        time.sleep(0.5)  # the evaluation is under way
        busy = []
        while not done.is_set() and len(busy) < args.repeats:
            busy.append(compare_once(engine, args.tokens))
        done.wait()
        alone_t = time.perf_counter()
        engine.evaluate(ids, [None, *adapters], seq_len=args.seq_len, max_tokens=args.eval_tokens)
        alone = time.perf_counter() - alone_t
        engine.close()
    during = statistics.median(busy) if busy else float("nan")
    print(f"model {args.model}, {args.tokens}-token compare, evaluation of 9 models x {args.eval_tokens} tokens "
          f"at context {args.seq_len}, torch threads {torch.get_num_threads()}")
    print(f"compare idle:            {idle * 1000:8.1f} ms (median of {args.repeats})")
    print(f"compare during the eval: {during * 1000:8.1f} ms (median of {len(busy)})  ->  {during / idle:.1f}x idle")
    print(f"evaluation: {eval_s[0]:.1f} s beside the compares, {alone:.1f} s alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
