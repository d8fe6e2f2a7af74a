"""The engine's GPU work as ZeroGPU calls (core.zerogpu): compare, evaluate, token differences and training
chunks (core.train.loop.train_chunk: a run's whole state comes back after each, and the next chunk goes on from it).

The main process keeps its base on the CPU and does every check there (adapter names, owners, sizes), so a
refusal is its own sentence; then it sends a `Site` (what the worker needs to rebuild the engine: the library
folder, the base, the precision) and the request, pickled, to a GPU call. The worker process builds its own
Engine on its device from the Site (loading the base from disk, adapters from the library) and keeps it in
`_WORKER` for as long as that process lives: ZeroGPU may send the next call to the same worker, and then the
base is there already. Nothing the worker changes comes back but the result.

An error raised in the worker comes back as a value (`Failed`) and is raised again here: ZeroGPU replaces the
message of any exception but gr.Error (which core cannot raise) with "ZeroGPU worker error".
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from core import zerogpu


@dataclass(frozen=True)
class Site:
    library_dir: str
    base: str  # the base's name ('gpt2', 'tiny', ...)
    weights: str | None  # its local weights, if any
    precision: str  # --precision: resolved on the worker's device
    device: str  # --device for the worker ('auto': its GPU)
    max_new_tokens: int


@dataclass(frozen=True)
class ChunkJob:
    """What every chunk of one training run needs besides its state (picklable)."""
    dataset: object  # core.train.data.Dataset
    lcfg: object  # core.lora.config.LoraConfig
    tcfg: object  # core.train.config.TrainConfig
    name: str  # the run's adapter name inside the model
    out_dir: str  # its run folder (checkpoints, history and the final adapter are written there)
    meta: dict  # studio.json fields (the run's library name, its user)


class Failed:
    """An exception raised in a GPU call, carried back as a value: its class when it is one of ours or a
    built-in error class, and its message."""

    def __init__(self, error: BaseException):
        self.cls = type(error) if isinstance(error, (ValueError, RuntimeError, OSError)) else RuntimeError
        self.message = str(error)

    def reraise(self):
        try:
            error = self.cls(self.message)
        except Exception:  # noqa: BLE001 - a class that needs more than a message
            error = RuntimeError(self.message)
        raise error


_WORKER: dict = {}  # Site -> this worker process's Engine (one at a time)


def worker_engine(site: Site):
    """(In the worker.) The engine of `site`, made on first use and kept while this worker lives."""
    from core.device import pick_device, precision_dtype
    from core.engine import Engine
    zerogpu.one_cpu_thread()
    engine = _WORKER.get(site)
    if engine is None:
        _WORKER.clear()
        device = pick_device(site.device)
        engine = Engine(device, site.library_dir, dtype=precision_dtype(site.precision, device),
                        max_new_tokens=site.max_new_tokens)
        _WORKER[site] = engine
    engine.base(site.base, site.weights)
    return engine


def _compare(site: Site, prompt: str, adapters: list, cfg):
    try:
        yield from worker_engine(site).compare(prompt, adapters, cfg)
    except Exception as e:  # noqa: BLE001 - carried back with its message
        yield Failed(e)


def _evaluate(site: Site, ids, adapters: list, seq_len: int, max_tokens: int, mask):
    try:
        return worker_engine(site).evaluate(ids, adapters, seq_len, max_tokens, mask=mask)
    except Exception as e:  # noqa: BLE001
        return Failed(e)


def _token_differences(site: Site, text: str, adapter: str):
    try:
        return worker_engine(site).token_differences(text, adapter)
    except Exception as e:  # noqa: BLE001
        return Failed(e)


def _train_chunk(site: Site, job: ChunkJob, state, seconds: float, stop: bool = False):
    """Train `job` from `state` (None: from the start; a TrainState or a checkpoint) for about `seconds`; a
    core.train.loop.Chunk. stop: end the run now, saved with a resume point (its last chunk)."""
    import threading
    from core.lora.layers import adapter_names, remove_adapter
    from core.train.loop import train_chunk
    from core.train.trainer import Trainer
    try:
        model = worker_engine(site).shared_model()
        try:
            flag = threading.Event()
            if stop:
                flag.set()
            # a state holds its LoRA settings; tcfg: the same, or a resumed checkpoint's new step count
            trainer = Trainer(model, job.dataset, None if state is not None else job.lcfg, job.tcfg, job.name,
                              job.out_dir, flag, base_id=site.base, resume=state, meta=job.meta)
            return train_chunk(trainer, max_seconds=seconds)
        finally:
            if job.name in adapter_names(model):  # a worker ZeroGPU reuses starts the next call clean
                remove_adapter(model, job.name)
    except Exception as e:  # noqa: BLE001
        return Failed(e)


def _answer(value):
    if isinstance(value, Failed):
        value.reraise()
    return value


class GpuCalls:
    """The main process's side: wraps the worker functions once (before launch, as ZeroGPU wants) and sends
    each request of `engine` to them. precision, device: the studio's --precision and --device, for the worker."""

    def __init__(self, precision: str = "auto", device: str = "auto"):
        self.precision, self.device = precision, device
        self._compare = zerogpu.gpu(_compare, lambda site, prompt, adapters, cfg:
                                    zerogpu.compare_seconds(len(adapters), cfg.max_new_tokens))
        self._evaluate = zerogpu.gpu(_evaluate, lambda site, ids, adapters, seq_len, max_tokens, mask:
                                     zerogpu.evaluate_seconds(len(adapters), max_tokens))
        self._token_differences = zerogpu.gpu(_token_differences, lambda site, text, adapter:
                                              zerogpu.evaluate_seconds(2, len(text)))
        self._train_chunk = zerogpu.gpu(_train_chunk, lambda site, job, state, seconds, stop=False:
                                        zerogpu.chunk_seconds(seconds))

    @classmethod
    def here(cls, precision: str = "auto", device: str = "auto") -> "GpuCalls | None":
        """The calls where ZeroGPU's rules apply (core.zerogpu.active), else None: the engine does its own work."""
        return cls(precision, device) if zerogpu.active() else None

    def site(self, engine) -> Site:
        name, weights = engine._base_key
        return Site(str(engine.library_dir), name, weights, self.precision, self.device, engine.max_new_tokens)

    def compare(self, engine, prompt, adapters, cfg, pace):
        """Texts (core.engine.Texts) from the GPU call as its tokens come, at most once per pace() seconds."""
        from core.engine import Texts
        with engine._pinned(adapters):  # the base stays while the call runs, as for a local request
            last, held = 0.0, None
            for texts in self._compare(self.site(engine), prompt, list(adapters), cfg):
                held = Texts(_answer(texts))
                if time.monotonic() - last >= pace():
                    yield held
                    last, held = time.monotonic(), None
            if held is not None:
                yield held  # the final texts, always

    def evaluate(self, engine, ids, adapters, seq_len, max_tokens, mask):
        with engine._pinned(adapters):
            return _answer(self._evaluate(self.site(engine), ids, list(adapters), seq_len, max_tokens, mask))

    def token_differences(self, engine, text, adapter):
        with engine._pinned([adapter]):
            return _answer(self._token_differences(self.site(engine), text, adapter))

    def train_chunk(self, engine, job: ChunkJob, state, seconds: float, stop: bool = False):
        """One chunk of `job` in a GPU call (core.train.loop.Chunk: its events, and its state unless it ended);
        stop: the run's last chunk, which saves it at once."""
        with engine._pinned([]):
            return _answer(self._train_chunk(self.site(engine), job, state, seconds, stop))
