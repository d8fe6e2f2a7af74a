"""A classroom on one base: N students' LoRA jobs train at once, co-batched through ONE TrainScheduler,
while M other users keep comparing generations on the same Engine. One run on this machine.

    python bench/classroom.py [--students 8] [--comparers 4] [--steps N] [--device cpu|cuda]
                              [--model tiny|gpt2] [--capacity TOKENS] [--uniform] [--json OUT]
                              [--idle-seconds 5] [--max-tokens 16] [--tolerance T] [--threads N]
    python bench/classroom.py --device cuda --model gpt2 --uniform --json OUT   # the GPU goals

What it does, in order, on one Engine (one shared base: `tiny`, or a random gpt2-shaped checkpoint
written by transformers and loaded as the gpt2 base):
  1. trains two small adapters for the comparers ('pirate', 'bard') into the engine's library;
  2. idle: M comparer threads run Compare (base and/or the two adapters, fixed seeds) in a loop for
     `--idle-seconds`: the answers every later phase must reproduce, and the latency with no training;
  3. co-batched: every student submits a job at once (each its own user, text, rank, targets, batch,
     sequence length and seed); they share every micro-step (core.train.cobatch); comparers go on;
  4. sequential: the same jobs again through the same scheduler, each submitted after the previous
     ended (each trains alone); comparers go on;
then prints a row per job (wall time from submit to end, steps, and whether the co-batched adapter
equals its solo one: the saved safetensors within 1e-5 on CPU fp32, 1e-2 by default on CUDA with
bf16 weights), and a row per phase (training tokens/s over the phase's wall time, the seconds inside
the forward+backward passes, the padded share of the co-batched steps, the comparers' answers/s and
latency), with the date and the machine, and the peak memory of the co-batched phase against the
largest job alone (CUDA: torch.cuda.max_memory_allocated; CPU: the process's peak resident set).

Students' settings cycle through a mix (batch x sequence 2x64, 4x128, 1x128 with 2 accumulation
steps, 4x64; ranks 4-16; different targets), so the co-batched steps pad; `--uniform` gives every
job 4 x 128, rank 8 on c_attn (the GPU goal: 8 gpt2 jobs at 4 x 128 >= 3x sequential, peak <= 1.5x
one job alone).

A benchmark, not a test: it reports; the exit status is 1 when a job or a compare failed, an answer
differed from its idle answer, or a co-batched adapter differed from its solo run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, random_hf_checkpoint, table  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import core.train.loop as loop  # noqa: E402
from core.engine import Engine  # noqa: E402
from core.generate.sampling import SamplingConfig  # noqa: E402
from core.lora.layers import adapter_names  # noqa: E402
from core.lora.config import LoraConfig
from core.train.config import TrainConfig
from core.train.data import list_samples, load_sample, prepare  # noqa: E402
from core.train.jobs import JobSpec, TrainScheduler  # noqa: E402

# (batch, seq, grad_accum, rank, targets), cycled over the students
MIX = [(2, 64, 1, 4, ("attn.c_attn",)),
       (4, 128, 1, 8, ("attn.c_attn",)),
       (1, 128, 2, 16, ("attn.c_attn", "mlp.c_fc")),
       (4, 64, 1, 8, ("mlp.c_fc",))]
UNIFORM = (4, 128, 1, 8, ("attn.c_attn",))
REQUESTS = [("Once upon a time", [None, "pirate"], 1),  # (prompt, adapters, seed): one Compare each
            ("Ahoy! Today in the galley we cook", ["pirate", "bard"], 2),
            ("ACT I. SCENE I. Enter", [None, "bard"], 3),
            ("The best advice I ever got was", [None], 4)]
LR = 1e-3


@dataclass
class Student:
    name: str
    data: str  # which text: a sample and where the slice starts
    ds: object  # core.train.data.Dataset
    lcfg: LoraConfig
    tcfg: TrainConfig
    jobs: dict = field(default_factory=dict)  # phase -> TrainJob
    peak: int | None = None  # peak memory while it trained alone, bytes (CUDA allocated; CPU resident)


def students(n: int, steps: int, uniform: bool) -> list[Student]:
    """n students, each with their own text (a bundled sample, from a different offset) and settings."""
    samples = [s["name"] for s in list_samples()]
    out = []
    for k in range(n):
        sample, part = samples[k % len(samples)], (k // len(samples)) % 4
        text = load_sample(sample)
        start = text.find("\n", part * len(text) // 8) + 1 if part else 0  # a line boundary, 0-3 eighths in
        ds = prepare(text=text[start:], text_name=f"{sample}.txt[{start}:]")
        batch, seq, accum, r, targets = UNIFORM if uniform else MIX[k % len(MIX)]
        tcfg = TrainConfig(steps=steps, lr=LR, batch_size=batch, seq_len=seq, grad_accum=accum,
                           eval_interval=0, checkpoint_interval=0, seed=100 + k)
        out.append(Student(f"student-{k + 1}", f"{sample}[{start}:]", ds, LoraConfig(r=r, alpha=2 * r,
                                                                                    targets=targets), tcfg))
    return out


class StepLog:
    """Records every shared micro-step (rows, padded length, real tokens) by wrapping the shared
    forward_backward where the scheduler's TrainLoop calls it (core.train.loop); nothing else changes."""

    def __init__(self):
        self.steps: list[tuple] = []  # (runs, rows, longest sequence, real tokens, seconds)
        self._inner = loop.forward_backward

    def __enter__(self):
        def logged(model, runs):
            shapes = [(r.tcfg.batch_size, r.seq_len) for r in runs]
            t0 = time.perf_counter()
            out = self._inner(model, runs)
            self.steps.append((len(runs), sum(b for b, _ in shapes), max(t for _, t in shapes),
                               sum(b * t for b, t in shapes), time.perf_counter() - t0))
            return out
        loop.forward_backward = logged
        return self

    def __exit__(self, *exc):
        loop.forward_backward = self._inner

    def summary(self, since: int = 0) -> dict:
        steps = self.steps[since:]
        real = sum(s[3] for s in steps)
        padded = sum(s[1] * s[2] for s in steps)
        return {"micro_steps": len(steps), "runs_per_step": statistics.mean(s[0] for s in steps) if steps else 0,
                "forward_backward_s": sum(s[4] for s in steps),
                "real_tokens": real, "padded_share": 1 - real / padded if padded else 0.0}


class Comparers:
    """M threads, each a user comparing in a loop; answers are filed under the phase they started and
    ended in, and checked against the first answer to the same request."""

    def __init__(self, engine: Engine, m: int, max_tokens: int):
        self.engine, self.max_tokens = engine, max_tokens
        self.phase = "idle"
        self.lat: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.mismatches = 0
        self.expected: dict[int, list[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(k,), daemon=True) for k in range(m)]

    def start(self):
        for t in self._threads:
            t.start()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(300)

    def _loop(self, k: int) -> None:
        i = k
        while not self._stop.is_set():
            req, i = i % len(REQUESTS), i + 1
            prompt, adapters, seed = REQUESTS[req]
            cfg = SamplingConfig(max_new_tokens=self.max_tokens, temperature=0.8, top_k=50, seed=seed,
                                 stop_at_eot=False)
            phase, t = self.phase, time.perf_counter()
            try:
                out = None
                for out in self.engine.compare(prompt, adapters, cfg, user=f"viewer-{k + 1}"):
                    pass
            except Exception as e:  # noqa: BLE001 - counted and shown
                with self._lock:
                    self.errors.append(f"viewer-{k + 1} request {req}: {type(e).__name__}: {str(e)[:200]}")
                time.sleep(0.1)  # a request that fails at once does not spin
                continue
            took = time.perf_counter() - t
            with self._lock:
                if self.expected.setdefault(req, out) != out:
                    self.mismatches += 1
                if self.phase == phase:
                    self.lat.setdefault(phase, []).append(took)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))] if s else float("nan")


# ---- the phases ---------------------------------------------------------------------------------

def spec(s: Student, folder: Path, base: tuple[str, str | None]) -> JobSpec:
    return JobSpec(s.name, base[0], s.ds, s.lcfg, s.tcfg, folder / s.name, user=s.name, weights=base[1])


def train_teachers(sched: TrainScheduler, engine: Engine, base) -> None:
    """The comparers' two adapters, trained into the engine's library before anything is measured."""
    jobs = []
    for name, sample, seed in (("pirate", "pirate_recipes", 1), ("bard", "shakespearean", 2)):
        ds = prepare(text=load_sample(sample), text_name=f"{sample}.txt")
        tcfg = TrainConfig(steps=3, lr=5e-3, batch_size=2, seq_len=32, grad_accum=1, eval_interval=0,
                           checkpoint_interval=0, seed=seed)
        jobs.append(sched.submit(JobSpec(name, base[0], ds, LoraConfig(r=8, alpha=16), tcfg,
                                         engine.library_dir / name, weights=base[1])))
    for job in jobs:
        job.wait()
        if job.snapshot()["state"] != "finished":
            raise SystemExit(f"the comparers' adapter {job.name} failed: {job.snapshot()['message']}")


def reset_peak(cuda: bool) -> None:
    """Measure the peak from now on: CUDA's allocated memory, or the process's resident set (Linux)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")
    except OSError:
        pass


def peak_bytes(cuda: bool) -> int | None:
    """The peak since reset_peak (None where the platform does not say)."""
    if cuda:
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def co_batched(sched, studs, folder: Path, base, cuda: bool) -> float:
    """Every student's job submitted at once; the phase's wall time (first submit to last end)."""
    reset_peak(cuda)
    t0 = time.perf_counter()
    for s in studs:
        s.jobs["co"] = sched.submit(spec(s, folder, base))
    for s in studs:
        s.jobs["co"].wait()
    return time.perf_counter() - t0


def sequential(sched, studs, folder: Path, base, cuda: bool) -> float:
    """The same jobs through the same scheduler, each submitted when the previous one has ended."""
    t0 = time.perf_counter()
    for s in studs:
        reset_peak(cuda)
        s.jobs["seq"] = sched.submit(spec(s, folder, base))
        s.jobs["seq"].wait()
        s.peak = peak_bytes(cuda)
    return time.perf_counter() - t0


def compare_saved(a: Path, b: Path) -> tuple[float, float]:
    """The largest difference between two saved adapters' tensors (inf when the key sets differ), and
    the largest |lora_B| of the first: B starts at zero, so 0 would mean it never trained."""
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    moved = max(float(v.abs().max()) for k, v in ta.items() if "lora_B" in k)
    if set(ta) != set(tb):
        return float("inf"), moved
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta), moved


# ---- the report -----------------------------------------------------------------------------------

def job_rows(studs, folder: Path, tol: float) -> tuple[list[list], list[dict]]:
    rows, figures = [], []
    for s in studs:
        co, seq = s.jobs["co"].snapshot(), s.jobs["seq"].snapshot()
        ok = co["state"] == seq["state"] == "finished"
        diff, moved = compare_saved(folder / "co" / s.name, folder / "seq" / s.name) if ok else (float("inf"), 0.0)
        t = s.tcfg
        f = {"name": s.name, "data": s.data, "batch": t.batch_size, "seq": s.jobs["co"].trainer.seq_len,
             "grad_accum": t.grad_accum, "rank": s.lcfg.r, "targets": list(s.lcfg.targets),
             "steps": co["progress"]["step"], "state": co["state"], "solo_state": seq["state"],
             "wait_s": co["started"] - co["submitted"], "wall_s": co["ended"] - co["submitted"],
             "solo_wall_s": seq["ended"] - seq["submitted"], "tokens": co["progress"].get("tokens", 0),
             "solo_tokens": seq["progress"].get("tokens", 0),
             "loss": co["points"][-1]["loss"] if co["points"] else None,
             "solo_loss": seq["points"][-1]["loss"] if seq["points"] else None,
             "max_diff": diff if diff != float("inf") else None, "max_abs_lora_B": moved,
             "equal": diff <= tol and moved > 0, "message": co["message"] if co["state"] != "finished" else ""}
        figures.append(f)
        rows.append([s.name, s.data, f"{f['batch']} x {f['seq']}" + (f" x{t.grad_accum}" if t.grad_accum > 1 else ""),
                     s.lcfg.r, "+".join(x.split(".")[1] for x in s.lcfg.targets), f"{f['steps']}/{t.steps}",
                     f"{f['wait_s']:.1f}", f"{f['wall_s']:.1f}", f"{f['solo_wall_s']:.1f}", f"{diff:.1e}",
                     "yes" if f["equal"] else "NO"])
    return rows, figures


def phase_row(name: str, wall: float, tokens: int | None, steps: dict | None, lat: list[float] | None) -> dict:
    """One phase's figures; lat None: nobody was comparing."""
    steps = steps or {}
    return {"phase": name, "wall_s": wall, "train_tokens": tokens,
            "train_tokens_per_s": tokens / wall if tokens and wall else None,
            "micro_steps": steps.get("micro_steps"), "runs_per_step": steps.get("runs_per_step"),
            "forward_backward_s": steps.get("forward_backward_s"), "padded_share": steps.get("padded_share"),
            "answers": len(lat) if lat is not None else None,
            "answers_per_s": len(lat) / wall if lat is not None and wall else None,
            "p50_s": statistics.median(lat) if lat else None, "p95_s": pct(lat, 0.95) if lat else None}


def show(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def measure(args, tmp: Path) -> dict:
    """The whole run: the engine, the scheduler, the comparers and the three phases; the figures."""
    cuda = args.device == "cuda"
    engine = Engine(device=args.device, library_dir=tmp / "lib")
    base = ("tiny", None) if args.model == "tiny" else ("gpt2", str(random_hf_checkpoint(folder=tmp / "gpt2")))
    engine.base(*base)  # loaded before the comparers start (a training job pins it again)
    sched = TrainScheduler.for_engine(engine, capacity_tokens=args.capacity)  # micro-steps on the base's work loop
    studs = students(args.students, args.steps, args.uniform)
    log, comparers = StepLog(), Comparers(engine, args.comparers, args.max_tokens)
    try:
        with log:
            train_teachers(sched, engine, base)
            comparers.start()
            t0 = time.perf_counter()
            time.sleep(args.idle_seconds)
            idle = time.perf_counter() - t0
            comparers.phase, mark = "co-batched", len(log.steps)
            co_wall = co_batched(sched, studs, tmp / "co", base, cuda)
            co_peak = peak_bytes(cuda)
            co_steps = log.summary(mark)
            comparers.phase, mark = "sequential", len(log.steps)
            seq_wall = sequential(sched, studs, tmp / "seq", base, cuda)
            seq_steps = log.summary(mark)
            comparers.phase = "done"
    finally:
        comparers.stop()
        sched.close()
    tol = args.tolerance
    rows, jobs = job_rows(studs, tmp, tol)
    lat = comparers.lat
    model = engine.shared_model()
    seen = (lambda phase: lat.get(phase, [])) if args.comparers else (lambda phase: None)
    phases = [phase_row("no training (comparers alone)", idle, None, None, seen("idle")),
              phase_row("co-batched (all jobs at once)", co_wall, sum(j["tokens"] for j in jobs), co_steps,
                        seen("co-batched")),
              phase_row("sequential (one job at a time)", seq_wall, sum(j["solo_tokens"] for j in jobs), seq_steps,
                        seen("sequential"))]
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
            "device": args.device, "model": args.model, "students": args.students, "comparers": args.comparers,
            "steps": args.steps, "uniform": args.uniform, "capacity_tokens": sched.capacity_tokens,
            "tolerance": tol, "jobs": jobs, "job_rows": rows, "phases": phases,
            "speedup": seq_wall / co_wall,
            "train_errors": sum(j["state"] != "finished" or j["solo_state"] != "finished" for j in jobs),
            "compare_errors": len(comparers.errors), "compare_problems": comparers.errors[:10],
            "mismatches": comparers.mismatches, "equal": sum(j["equal"] for j in jobs),
            "adapters_left": [n for n in adapter_names(model) if n.startswith("student-")],
            "pins_left": engine._base_pins,
            "peak_co_bytes": co_peak,
            "peak_solo_bytes": max(s.peak for s in studs) if all(s.peak for s in studs) else None}


def report(r: dict, args) -> None:
    print(f"LoRA Studio classroom benchmark, {r['date']}")
    print(f"machine: {r['machine']}")
    base = "tiny" if r["model"] == "tiny" else "gpt2 124M shapes (random weights written by transformers)"
    print(f"{r['students']} students on {base}, {r['device']}, {r['steps']} steps each, lr {LR:g}; one Engine, "
          f"one TrainScheduler (capacity {r['capacity_tokens'] or 'memory-based'} tokens per shared step); "
          f"{r['comparers']} user{'s' * (r['comparers'] != 1)} comparing ({len(REQUESTS)} kinds of request, "
          f"1-2 columns, {args.max_tokens} new tokens) the whole time\n")
    print(table(r["job_rows"], ["job", "text", "batch x seq", "rank", "targets", "steps", "queued s",
                                "wall s (submit to end)", "alone s", "max |co - alone|", "equal"]))
    print()
    rows = [[p["phase"], show(p["wall_s"], ".1f"), show(p["train_tokens_per_s"], ",.0f"),
             show(p["micro_steps"], "d"), show(p["runs_per_step"], ".1f"), show(p["forward_backward_s"], ".1f"),
             "-" if p["padded_share"] is None else f"{100 * p['padded_share']:.0f}%",
             show(p["answers"], "d"), show(p["answers_per_s"], ".2f"), show(p["p50_s"], ".2f"),
             show(p["p95_s"], ".2f")] for p in r["phases"]]
    print(table(rows, ["phase", "wall s", "train tok/s", "micro-steps", "jobs per step", "in fwd+bwd s",
                       "padded", "answers", "answers/s", "p50 s", "p95 s"]))
    verdicts(r)


def verdicts(r: dict) -> None:
    """The lines under the tables: the ratios, the checks and (CUDA) the memory."""
    idle, co = r["phases"][0], r["phases"][1]
    print(f"co-batched / sequential training throughput: {r['speedup']:.2f}x (each phase from the first submit "
          f"to the last end, evaluations and saves included)")
    if idle["p95_s"] and co["p95_s"]:
        print(f"comparing while the class trains: p50 {co['p50_s'] / idle['p50_s']:.1f}x, p95 "
              f"{co['p95_s'] / idle['p95_s']:.1f}x the no-training latency; answers/s "
              f"{co['answers_per_s'] / idle['answers_per_s']:.2f}x")
    what = "CPU fp32" if r["device"] != "cuda" else "CUDA bf16 weights: a looser tolerance, rounding differs"
    trained = all(j["max_abs_lora_B"] > 0 for j in r["jobs"])
    print(f"equal to solo: {r['equal']} of {len(r['jobs'])} (saved adapter tensors within {r['tolerance']:g}, "
          f"{what}; every lora_B moved from its zero init: {'yes' if trained else 'NO'})")
    print(f"errors: {r['train_errors']} training, {r['compare_errors']} compare; answers differing from the "
          f"idle answer: {r['mismatches']}; live student adapters left: {len(r['adapters_left'])}; base pins "
          f"left: {r['pins_left']}")
    for p in r["compare_problems"]:
        print("  " + p)
    for j in r["jobs"]:
        if j["message"]:
            print(f"  {j['name']}: {j['message']}")
    if r["peak_co_bytes"] and r["peak_solo_bytes"]:
        ratio = r["peak_co_bytes"] / r["peak_solo_bytes"]
        what = "GPU memory allocated" if r["device"] == "cuda" else "resident memory of the process"
        goal = f" (goal <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})" if r["device"] == "cuda" else ""
        print(f"peak {what}, comparers included: co-batched {r['peak_co_bytes'] / 2**30:.2f} GiB, the largest "
              f"job alone {r['peak_solo_bytes'] / 2**30:.2f} GiB: {ratio:.2f}x{goal}")
    if r["device"] == "cuda":
        goal = r["model"] == "gpt2" and r["uniform"] and r["students"] == 8
        verdict = ("met" if r["speedup"] >= 3 else "NOT met") if goal else "not this setting (--model gpt2 --uniform)"
        print(f"speed-up goal >= 3x for 8 gpt2 jobs at 4 x 128: {verdict}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", type=int, default=8, help="training jobs, one per student (default 8)")
    p.add_argument("--comparers", type=int, default=4, help="users comparing in a loop meanwhile (default 4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default 8 on CPU, 50 on CUDA)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", choices=["tiny", "gpt2"], default="tiny",
                   help="tiny, or gpt2 shapes (a random checkpoint written by transformers)")
    p.add_argument("--capacity", type=int, default=None,
                   help="tokens per shared step (default: the scheduler's, 4096 on CPU, memory-based on CUDA)")
    p.add_argument("--uniform", action="store_true", help="every job 4 x 128, rank 8 on c_attn (no mix)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="comparers alone first, s (default 5)")
    p.add_argument("--max-tokens", type=int, default=16, help="new tokens per Compare column (default 16)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest difference between a co-batched and a solo adapter's tensors counted as equal "
                        "(default 1e-5 on CPU fp32; 1e-2 on CUDA, bf16 weights: to calibrate on a first GPU run)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = p.parse_args()
    args.steps = args.steps or (50 if args.device == "cuda" else 8)
    args.tolerance = args.tolerance if args.tolerance is not None else (1e-2 if args.device == "cuda" else 1e-5)
    if args.students < 1 or args.comparers < 0 or args.steps < 1:
        raise SystemExit("--students and --steps must be at least 1, --comparers at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-classroom-"))
    try:
        r = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(r, args)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in r.items() if k != "job_rows"}, indent=2) + "\n")
    bad = r["train_errors"] + r["compare_errors"] + r["mismatches"] + (len(r["jobs"]) - r["equal"])
    return 1 if bad or r["adapters_left"] or r["pins_left"] else 0


if __name__ == "__main__":
    sys.exit(main())
