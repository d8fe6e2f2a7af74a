"""ZeroGPU, Hugging Face Spaces' shared GPUs: GPU work runs only inside functions wrapped by
`spaces.GPU(duration=...)`, each call in a worker process forked from the main one (and killed when another
Space needs the GPU); arguments and results cross by pickle; the main process must never start CUDA, and
what a call changes in its module state stays in the worker.

`gpu(fn, duration)` is the one place the `spaces` package is used: on ZeroGPU it returns
`spaces.GPU(duration=...)(fn)` (imported here only, so the package is needed only there); elsewhere it returns
`fn` itself, which is also what `spaces.GPU` does outside ZeroGPU. With LORA_STUDIO_ZEROGPU_SIMULATE=1 each call
runs in a fresh forked process instead, arguments and results pickled (`forked`): ZeroGPU's process model on
any machine, for tests and for trying a Space locally.
"""
from __future__ import annotations

import functools
import inspect
import multiprocessing
import os
import pickle
from typing import Callable

ZERO_GPU_ENV = "SPACES_ZERO_GPU"  # set by Hugging Face on ZeroGPU Spaces
SIMULATE_ENV = "LORA_STUDIO_ZEROGPU_SIMULATE"
MAX_CALL_S = 120  # the longest GPU call asked for: ZeroGPU refuses longer ones for most accounts
SETUP_S = 15  # a call's fixed cost: the worker loads the base from disk, moves it to the GPU, loads adapters
DECODE_TOKENS_PER_S = 50  # new tokens per second per row, low for a GPU: rows of a batch are counted in full
SCORE_TOKENS_PER_S = 20_000  # evaluation tokens per second per model, low for a GPU


def on_zerogpu() -> bool:
    """Whether this process runs on a ZeroGPU Space: the `spaces` package's own rule."""
    return (os.environ.get(ZERO_GPU_ENV) or "").lower() in ("1", "t", "true")


def simulated() -> bool:
    return (os.environ.get(SIMULATE_ENV) or "").lower() in ("1", "t", "true")


def active() -> bool:
    """ZeroGPU's rules apply: on ZeroGPU, or simulated. The main process then keeps the base on the CPU and
    sends compare, evaluation, token differences and training chunks to GPU calls."""
    return on_zerogpu() or simulated()


def gpu(fn: Callable, duration: Callable[..., float]) -> Callable:
    """`fn` as a GPU call: duration(*args, **kwargs) gives the seconds to ask for (capped at MAX_CALL_S).
    Outside ZeroGPU and its simulation, `fn` itself."""
    if on_zerogpu():
        import spaces  # only on ZeroGPU, where the Space lists it (requirements.txt of the Space)
        return spaces.GPU(duration=lambda *a, **k: capped(duration(*a, **k)))(fn)
    if simulated():
        return forked(fn)
    return fn


def capped(seconds: float) -> int:
    return int(max(1, min(MAX_CALL_S, round(seconds))))


def compare_seconds(rows: int, new_tokens: int) -> int:
    return capped(SETUP_S + rows * new_tokens / DECODE_TOKENS_PER_S)


def evaluate_seconds(models: int, tokens: int) -> int:
    return capped(SETUP_S + models * tokens / SCORE_TOKENS_PER_S)


def chunk_seconds(train_s: float) -> int:
    """A training chunk that stops itself after `train_s` seconds of training."""
    return capped(SETUP_S + train_s)


def one_cpu_thread() -> None:
    """(In a forked worker.) torch's CPU ops on this thread alone: GNU OpenMP's thread team does not survive a
    fork, and the child's first parallel CPU op would wait for it forever."""
    import sys
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def forked(fn: Callable) -> Callable:
    """`fn` run, each call, in a fresh process forked from this one, as ZeroGPU runs a GPU call: arguments and
    results (each item, for a generator function) pickled across; what the call changes stays in the child.
    An exception raised there is raised here (pickled too); a child that dies without an answer is a
    RuntimeError. Closing a generator early kills its child."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def stream(*args, **kwargs):
            yield from _in_child(fn, args, kwargs, True)
        return stream

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return next(_in_child(fn, args, kwargs, False))
    return call


def _in_child(fn, args, kwargs, stream: bool):
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    payload = pickle.dumps((args, kwargs))  # here, so an argument that cannot cross fails as it would there
    child = ctx.Process(target=_child, args=(fn, payload, send, stream), daemon=True)
    child.start()
    send.close()
    try:
        while True:
            try:
                kind, value = pickle.loads(receive.recv_bytes())
            except EOFError:
                raise RuntimeError("the GPU worker ended before it answered; try again.") from None
            if kind == "raise":
                raise value
            if kind == "done":
                return
            yield value
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join()


def _child(fn, payload: bytes, send, stream: bool) -> None:
    one_cpu_thread()
    try:
        args, kwargs = pickle.loads(payload)
        for item in (fn(*args, **kwargs) if stream else [fn(*args, **kwargs)]):
            send.send_bytes(pickle.dumps(("item", item)))
        send.send_bytes(pickle.dumps(("done", None)))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller, as ZeroGPU's worker does
        try:
            message = pickle.dumps(("raise", e))
        except Exception:  # noqa: BLE001 - an exception that does not pickle
            message = pickle.dumps(("raise", RuntimeError(f"{type(e).__name__} in the GPU call: {e}")))
        send.send_bytes(message)
    finally:
        send.close()
