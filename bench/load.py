"""Many users at once: the studio on localhost with the `tiny` model training in the background, and
N concurrent gradio_client clients each running side-by-side comparisons for a while.

    python bench/load.py [--clients 20] [--seconds 60] [--max-tokens 32] [--solo-rounds 3]
                         [--no-training] [--server-threads N]
                         [--client light|gradio_client]

What it does, in order:
  1. prepares a dataset and trains two small adapters (core, in this process) in a fresh library;
then, through the one decode engine (every Compare in one decode scheduler):
  2. starts `python app.py --model tiny [--torch-threads N]` on 127.0.0.1 in its own
     process (as a user would);
  3. starts a long training run through the API (/start_training), so the machine is busy training;
  4. solo: one client runs each request of a fixed set alone, in turn, `--solo-rounds` times: the
     expected answers (a repeat must give the same text) and the solo latency;
  5. load: `--clients` clients, each its own connection (`--client`: light by default, as a browser tab;
     or gradio_client), send those requests in a loop for
     `--seconds`; every answer is compared with the solo answer of the same request (same seed),
     so a mix-up between users shows as a mismatch;
  6. stops the training run and the server;
and prints one table, a row per mode, with the date and the machine (and whether the modes' answers agree),
the streamed updates the clients received per answer (each is an event the server encodes and sends) and
the server's CPU seconds per answer (training included, unless --no-training).

A benchmark, not a test: it reports; the exit status is 1 only when a request failed or mismatched.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from common import ROOT, table

REQUESTS = [  # (include base, adapters, prompt, seed): one column per model, all in one batched pass
    (True, [], "Once upon a time", 1),
    (True, ["pirate"], "Ahoy! Today in the galley we cook", 2),
    (False, ["pirate", "bard"], "ACT I. SCENE I. Enter", 3),
    (True, ["bard"], "no cap the bus this morning", 4),
    (True, ["pirate", "bard"], "The best advice I ever got was", 5),
    (False, ["bard"], "Once upon a time", 6),
]
SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.95)


def first_difference(got: list[str], want: list[str]) -> str:
    """Where two answers (a text per column) part: the column and the text up to there, to trace it."""
    for col, (g, w) in enumerate(zip(got, want)):
        if g != w:
            at = next((j for j, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
            return f"column {col}, from character {at}: {g[max(0, at - 20):at + 20]!r} vs {w[max(0, at - 20):at + 20]!r}"
    return f"{len(got)} columns against {len(want)}"


def prepare_library(tmp: Path) -> None:
    """A dataset and two small trained adapters, before the server starts (its pickers list them)."""
    from core.lora.config import LoraConfig
    from core.train.config import TrainConfig
    from core.train.data import SAMPLES_DIR, prepare
    from core.train.loop import train_chunk
    from core.train.trainer import Trainer
    from core.model.weights import load_base
    model = load_base("tiny", "cpu")
    for name, sample, seed in (("pirate", "pirate_recipes", 1), ("bard", "shakespearean", 2)):
        ds = prepare([SAMPLES_DIR / f"{sample}.txt"], tmp / "datasets" / name)
        tcfg = TrainConfig(steps=30, lr=5e-3, batch_size=4, seq_len=64, grad_accum=1, eval_interval=0, seed=seed)
        chunk = train_chunk(Trainer(model, ds, LoraConfig(r=8, alpha=16), tcfg, name, tmp / "lib" / name, base_id="tiny"))
        assert chunk.outcome == "finished", chunk.events[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, port: int, mode: str, threads: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(tmp / f"server-{mode}.log", "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--device", "cpu",
                             "--library", str(tmp / "lib"), "--datasets", str(tmp / "datasets"),
                             "--host", "127.0.0.1", "--port", str(port),
                             *(["--torch-threads", str(threads)] if threads else [])],
                            cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {tmp / f'server-{mode}.log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


class QueueClient:
    """One user's connection, doing what a browser tab does for a Compare and no more: join Gradio's
    queue with one POST, then read the event's server-sent messages until it completes, on one kept-alive
    HTTP connection; then run the events the page chains after it (`.then()`), as a browser does. A
    `.then()` for the model status cost a third of the answers per second before the compare brought the
    status itself. (gradio_client, the other choice, also runs a thread per job that polls every 50 ms
    and opens a new connection per request: 30 of them in this process took as much CPU as the studio.)"""

    def __init__(self, url: str, api_name: str = "compare"):
        import httpx
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(30.0, read=None))
        deps = self.http.get("/config").raise_for_status().json()["dependencies"]
        main = next(d for d in deps if d.get("api_name") == api_name)
        self.fn_index = main["id"]
        # chained events: (id, for each of its inputs the position among the compare's inputs)
        self.chained = [(d["id"], [main["inputs"].index(i) for i in d["inputs"]])
                        for d in deps if d.get("trigger_after") == main["id"]]
        self.session = uuid.uuid4().hex

    def submit(self, data: list, timeout: float) -> tuple[list, int]:
        """The outputs of one call and how many updates the server streamed for it (chained events run
        after it, as the page runs them, before the next call)."""
        out = self._call(self.fn_index, data, timeout)
        for fn_index, at in self.chained:
            self._call(fn_index, [data[i] for i in at], timeout)
        return out

    def _call(self, fn_index: int, data: list, timeout: float) -> tuple[list, int]:
        r = self.http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                           "session_hash": self.session})
        r.raise_for_status()
        event_id, updates = r.json()["event_id"], 0
        deadline = time.time() + timeout
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                if time.time() > deadline:
                    raise TimeoutError(f"no answer within {timeout:.0f} s")
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (None, event_id):
                    continue
                if msg["msg"] == "process_generating":  # a streamed update: an event the server encoded
                    updates += 1
                elif msg["msg"] == "process_completed":  # holds the final values, whole
                    if not msg.get("success", True):
                        raise RuntimeError(str(msg.get("output", {}).get("error")))
                    return msg["output"]["data"], updates
                elif msg["msg"] in ("unexpected_error", "server_stopped"):
                    raise RuntimeError(msg.get("message") or msg["msg"])
        raise RuntimeError("the server closed the stream before the answer was complete")


def ask(client, request, max_tokens: int, timeout: float) -> tuple[list[str], int]:
    """The final texts of one compare, and how many updates the server streamed for it."""
    include_base, adapters, prompt, seed = request
    data = ["tiny", include_base, adapters, prompt, SAMPLING["temperature"], SAMPLING["top_k"],
            SAMPLING["top_p"], max_tokens, seed]
    if isinstance(client, QueueClient):
        out, updates = client.submit(data + [False], timeout)  # + the compare's last input, apply_template
    else:
        job = client.submit(*data, api_name="/compare")
        out, updates = job.result(timeout=timeout), len(job.outputs())
    return list(out[:(1 if include_base else 0) + len(adapters)]), updates


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))] if s else float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_mode(tmp: Path, mode: str, args) -> dict:
    """One served studio in `mode`: solo answers, then the clients' load; returns the measurements."""
    from gradio_client import Client
    server = None
    try:
        t0 = time.time()
        port = free_port()
        server = start_server(tmp, port, mode, args.server_threads)
        url = f"http://127.0.0.1:{port}/"
        control = Client(url, verbose=False)
        msg = "none (--no-training)"
        if not args.no_training:
            msg = control.predict("tiny", "pirate", f"background-{mode}", ["attn.c_attn", "mlp.c_fc"], 8, 16, 0.0,
                                  1e-3, 100_000, 4, 1, 128, 50, 1337, "Ahoy", api_name="/start_training")[0]
            if "Started" not in msg:
                raise SystemExit(f"could not start the background training run: {msg}")
        print(f"[{mode}] setup {time.time() - t0:.0f} s; background training: {msg}", flush=True)

        # solo: each request alone, in turn, through the same kind of client as the load
        solo_client = QueueClient(url) if args.client == "light" else control
        expected, solo, solo_errors = {}, [], 0
        for _ in range(args.solo_rounds):
            for i, req in enumerate(REQUESTS):
                t = time.perf_counter()
                try:
                    out, _ = ask(solo_client, req, args.max_tokens, args.timeout)
                except Exception as e:  # noqa: BLE001 - counted and shown
                    solo_errors += 1
                    print(f"[{mode}] solo error on request {i}: {type(e).__name__}: {e}", flush=True)
                    continue
                solo.append(time.perf_counter() - t)
                if expected.setdefault(i, out) != out:
                    solo_errors += 1
                    print(f"[{mode}] solo request {i} gave a different text when repeated", flush=True)
        if len(expected) < len(REQUESTS):
            raise SystemExit("some requests never succeeded alone; see the messages above")
        if not all(len(expected[i]) == (1 if r[0] else 0) + len(r[1]) and all(t.startswith(r[2]) for t in expected[i])
                   for i, r in enumerate(REQUESTS)):
            raise SystemExit("the solo answers do not look like continuations of their prompts")

        # load: N clients in a loop
        lat: list[float] = []
        counts = {"sent": 0, "answered": 0, "errors": 0, "mismatches": 0, "updates": 0}
        problems: list[str] = []
        lock = threading.Lock()
        clients = [QueueClient(url) if args.client == "light" else Client(url, verbose=False)
                   for _ in range(args.clients)]
        start = time.time() + 1.0
        stop_at = start + args.seconds

        def worker(k: int) -> None:
            while time.time() < start:
                time.sleep(0.01)
            n = k
            while time.time() < stop_at:
                i = n % len(REQUESTS)
                n += 1
                with lock:
                    counts["sent"] += 1
                t = time.perf_counter()
                try:
                    out, updates = ask(clients[k], REQUESTS[i], args.max_tokens, args.timeout)
                except Exception as e:  # noqa: BLE001 - counted and shown
                    with lock:
                        counts["errors"] += 1
                        problems.append(f"client {k} request {i}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                dt_s = time.perf_counter() - t
                with lock:
                    counts["answered"] += 1
                    counts["updates"] += updates
                    lat.append(dt_s)
                    if out != expected[i]:
                        counts["mismatches"] += 1
                        problems.append(f"client {k} request {i}: answer differs from the solo answer "
                                        f"({first_difference(out, expected[i])})")

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(args.clients)]
        for th in threads:
            th.start()
        while time.time() < start:
            time.sleep(0.01)
        cpu0 = (cpu_seconds(server.pid), cpu_seconds(os.getpid()))
        for th in threads:
            th.join(args.seconds + args.timeout + 30)
        wall = time.time() - start
        cpu = (cpu_seconds(server.pid) - cpu0[0], cpu_seconds(os.getpid()) - cpu0[1])
        unanswered = counts["sent"] - counts["answered"] - counts["errors"]

        training_note = "no training run" if args.no_training else control.predict(api_name="/stop_training")
        saved = tmp / "lib" / f"background-{mode}" / "studio.json"
        deadline = time.time() + 60
        while not args.no_training and not saved.exists() and time.time() < deadline:
            time.sleep(0.2)
        if saved.exists():
            import json
            training_note += f" It had trained {json.loads(saved.read_text())['steps']} steps meanwhile."
        return dict(mode=mode, expected=expected, solo=solo, solo_errors=solo_errors, lat=lat, counts=counts,
                    problems=problems, wall=wall, cpu=cpu, unanswered=unanswered, training_note=training_note)
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    ap.add_argument("--seconds", type=float, default=60, help="how long the clients keep sending (default 60)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per column (default 32)")
    ap.add_argument("--solo-rounds", type=int, default=3, help="times each request runs alone (default 3)")
    ap.add_argument("--timeout", type=float, default=300, help="longest wait for one answer, s (default 300)")
    ap.add_argument("--no-training", action="store_true", help="no background training run (to compare)")
    ap.add_argument("--server-threads", type=int, default=None, metavar="N",
                    help="the server's --torch-threads (default: torch's choice, one per core)")
    ap.add_argument("--client", choices=("light", "gradio_client"), default="light",
                    help="how the clients talk to the studio: light (one connection each, as a browser tab) or "
                         "gradio_client (a thread per request polling every 50 ms: more CPU on this machine)")
    args = ap.parse_args()
    modes = ["engine"]  # the one decode path (before issue 28: --generation loop or batched)

    tmp = Path(tempfile.mkdtemp(prefix="lora-load-"))
    try:
        t0 = time.time()
        prepare_library(tmp)
        print(f"adapters trained in {time.time() - t0:.0f} s", flush=True)
        results = [run_mode(tmp, m, args) for m in modes]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    import gradio
    import torch
    print()
    print(f"LoRA Studio load benchmark, {dt.date.today().isoformat()}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs (nproc), {platform.system()} {platform.release()}; "
          f"python {platform.python_version()}, torch {torch.__version__}, gradio {gradio.__version__}")
    print("server: python app.py --model tiny; "
          "background: " + ("nothing (--no-training)" if args.no_training else
                            "a tiny LoRA training run (batch 4 x 128, rank 8, c_attn + c_fc) the whole time"))
    if args.server_threads:
        print(f"server torch threads: {args.server_threads} (app.py --torch-threads)")
    print(f"clients: {args.client}" + (" (one connection each, as a browser tab)" if args.client == "light" else
                                       " (a thread per request, polling every 50 ms)"))
    print(f"requests: {len(REQUESTS)} kinds (base and/or 1-2 adapters, 1-3 columns), {args.max_tokens} new "
          f"tokens per column, temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}, "
          f"top-p {SAMPLING['top_p']}, a fixed seed each")
    print()
    rows, failed = [], 0
    for r in results:
        c, solo, lat, wall = r["counts"], r["solo"], r["lat"], r["wall"]
        solo_p50 = statistics.median(solo)
        p50, p95 = (statistics.median(lat), pct(lat, 0.95)) if lat else (float("nan"), float("nan"))
        r.update(solo_p50=solo_p50, p95=p95, throughput=c["answered"] / wall)
        per = c["answered"] or 1
        rows.append([r["mode"], args.clients, f"{wall:.0f} s", c["sent"], c["answered"], c["errors"] + r["unanswered"],
                     c["mismatches"], f"{solo_p50:.2f} s", f"{p50:.2f} s", f"{p95:.2f} s", f"{p95 / solo_p50:.1f}x",
                     f"{r['throughput']:.2f}/s", f"{c['updates'] / per:.1f} ({c['updates'] / wall:.0f}/s)",
                     f"{r['cpu'][0] / per:.2f} s"])
        failed += c["errors"] + r["unanswered"] + c["mismatches"] + r["solo_errors"]
    print(table(rows, ["mode", "clients", "duration", "requests", "answered", "errors", "mismatches", "solo p50",
                       "p50", "p95", "p95 / solo p50", "throughput", "updates per answer", "server CPU per answer"]))
    for r in results:
        c = r["counts"]
        bad = c["errors"] + r["unanswered"] + c["mismatches"]
        met = "met" if not bad and r["p95"] <= 5 * r["solo_p50"] else "NOT met"
        print(f"[{r['mode']}] solo: {len(r['solo'])} requests alone (p50 {r['solo_p50']:.2f} s, p95 "
              f"{pct(r['solo'], 0.95):.2f} s), {r['solo_errors']} problems; goal: 0 errors, 0 mismatches, "
              f"p95 at most 5x solo -> {met}")
        print(f"[{r['mode']}] CPU time while loaded: server {r['cpu'][0]:.0f} s, the {args.clients} clients (this "
              f"process) {r['cpu'][1]:.0f} s, of {r['wall'] * (os.cpu_count() or 1):.0f} s available")
        print(f"[{r['mode']}] stop: {r['training_note']}")
        for p in r["problems"][:10]:
            print("  " + p)
    by = {r["mode"]: r for r in results}
    if "loop" in by and "batched" in by:
        ratio = by["batched"]["throughput"] / by["loop"]["throughput"] if by["loop"]["throughput"] else float("inf")
        same = sum(by["loop"]["expected"][i] == by["batched"]["expected"][i] for i in range(len(REQUESTS)))
        print(f"batched / loop throughput: {ratio:.2f}x (goal at least 3x); solo answers identical in both modes: "
              f"{same} of {len(REQUESTS)} requests (a difference can only be a floating-point near-tie)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
