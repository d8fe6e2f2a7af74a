"""The decode scheduler against one request after another, one run on this machine (CPU, `tiny`).

N requests (1 to 4 rows each: the base and/or two adapters, different prompts, settings and seeds)
go through `generate` one after another (the same decode engine, one request at a time on the caller's
thread), then all at once through one DecodeScheduler, each from
its own thread. Reported: new tokens per second over all requests, per-request latency (p50/p95:
from the moment all requests arrived to the request's last token),
and how many requests' tokens differ from their solo run (0 expected: sampling keeps the top k;
see tests/test_scheduler.py for full-vocabulary near-ties).

    python bench/scheduler.py [--requests 16] [--max-tokens 32] [--max-rows 32] [--threads 2] [--rounds 3]
                               [--precision fp32|bf16|auto]

A benchmark, not a test: it reports; the exit status is 1 only on a mismatch or an error.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

import torch  # noqa: E402

from core.device import PRECISIONS, precision_dtype, precision_name  # noqa: E402
from core.generate.sampling import SamplingConfig, generate  # noqa: E402
from core.generate.scheduler import DecodeScheduler  # noqa: E402
from core.lora import layers as lora  # noqa: E402
from core.lora.config import LoraConfig
from core.model.weights import load_base  # noqa: E402


def tiny_with_adapters(dtype: torch.dtype = torch.float32):
    """The tiny preset with two adapters whose B is non-zero (so they change the output)."""
    model = load_base("tiny", device="cpu", dtype=dtype)
    g = torch.Generator().manual_seed(0)
    for name, targets in (("a", ("attn.c_attn",)), ("b", ("mlp.c_fc", "mlp.c_proj"))):
        lora.add_adapter(model, name, LoraConfig(r=8, targets=targets))
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                if layer.has(name):
                    B = layer.weights(name)[1]
                    B.copy_(torch.randn(B.shape, generator=g) * 0.3)
    return model


def requests(n: int, max_tokens: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(50257) for _ in range(rng.randint(4, 48))]
        adapters = rng.sample([None, "a", "b"], rng.randint(1, 3)) + ([None] if i % 4 == 3 else [])
        cfg = SamplingConfig(max_new_tokens=max_tokens, temperature=0.8 if i % 3 else 0.0, top_k=50,
                             seed=rng.randrange(10**6), stop_at_eot=False)
        out.append((prompt, adapters, cfg))
    return out


def one_after_another(model, specs):
    latencies, outputs = [], []
    t0 = time.perf_counter()
    for prompt, adapters, cfg in specs:  # all arrived at t0: a request's latency includes its wait
        outputs.append(generate(model, [prompt] * len(adapters), adapters, cfg))
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - t0, latencies, outputs


def through_scheduler(model, specs, max_rows: int):
    sched = DecodeScheduler(model, max_rows=max_rows, max_queue=len(specs), max_rows_per_user=8)
    latencies, outputs = [0.0] * len(specs), [None] * len(specs)

    def client(i):
        t = time.perf_counter()
        try:
            outputs[i] = sched.submit(*specs[i], user=i).result(600)
        except Exception as e:  # reported as an error, not a crash of the benchmark
            outputs[i] = e
        latencies[i] = time.perf_counter() - t

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(specs))]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    steps = sched.step_count
    sched.close()
    return wall, latencies, outputs, steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-rows", type=int, default=32, help="slots in the scheduler's KV pool")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both modes; the median round is shown")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS,
                    help="the base's dtype, as the studio's --precision (auto: bf16 on CPUs that compute it natively)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = precision_dtype(args.precision, torch.device("cpu"))
    model = tiny_with_adapters(dtype)
    specs = requests(args.requests, args.max_tokens)
    new_tokens = sum(len(a) * c.max_new_tokens for _, a, c in specs)
    with torch.inference_mode():
        generate(model, [[1, 2, 3]], ["a"], SamplingConfig(max_new_tokens=4))  # warm-up
    seq_runs, runs = [], []
    for _ in range(args.rounds):  # alternating, so a busy moment of a shared machine hits both modes
        seq_runs.append(one_after_another(model, specs))
        runs.append(through_scheduler(model, specs, args.max_rows))
    median = lambda rs: sorted(rs, key=lambda r: r[0])[len(rs) // 2]  # the round of median wall time
    (seq_wall, seq_lat, expected), (wall, lat, got, steps) = median(seq_runs), median(runs)
    answers = [g for run in runs for g in run[2]]  # every round counts, not only the median one
    errors = sum(isinstance(g, Exception) for g in answers)
    mismatches = sum(not isinstance(g, Exception) and g != e for g, e in zip(answers, expected * args.rounds))
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]
    rows = [["one after another (generate)", f"{new_tokens / seq_wall:.0f}", f"{q(seq_lat, 50):.3f}",
             f"{q(seq_lat, 95):.3f}", "-", "-", "-"],
            ["all at once (DecodeScheduler)", f"{new_tokens / wall:.0f}", f"{q(lat, 50):.3f}", f"{q(lat, 95):.3f}",
             f"{steps}", f"{errors}", f"{mismatches}"]]
    print(f"{machine()}; tiny on the CPU in {precision_name(dtype)}; {args.requests} requests, {new_tokens} new tokens "
          f"({sum(len(a) for _, a, _ in specs)} rows), {args.max_rows} slots; median of {args.rounds} rounds")
    print(table(rows, ["mode", "new tok/s", "latency p50 s", "p95 s", "decode steps", "errors", "mismatches"]))
    print(f"speed-up: {seq_wall / wall:.2f}x")
    return 1 if errors or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
