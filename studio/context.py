"""What every tab shares: the one Engine (base model + adapters), the training Runner, folders, options.

Nothing here goes into gr.State: a Studio is created once per process and closed over by the tabs.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gradio as gr

from core.adapter_library import shown_name, valid_name
from core.adapters import AdapterError
from core.atomic import disk_full
from core.config import PRESETS
from core.data import read_dataset_meta
from core.engine import Engine
from core.train import TrainingError
from core.weights import WeightsError

from .models import CHOICES, HubProbe, availability, describe
from .runner import Runner, RunnerBusy

USER_ERRORS = (ValueError, WeightsError, AdapterError, TrainingError, RunnerBusy, FileNotFoundError)


@dataclass
class Studio:
    engine: Engine
    datasets_dir: Path
    default_model: str = "gpt2"  # the base picked when a page opens
    weights: str | None = None  # --weights: local files for `weights_for`
    weights_for: str | None = None
    auth: bool = False  # sign-in is on: record user names, only owners stop their jobs
    runner: Runner = field(init=False)
    probe: HubProbe = field(default_factory=HubProbe)
    exports_dir: Path = field(init=False)

    def __post_init__(self):
        self.datasets_dir = Path(self.datasets_dir).expanduser().resolve()
        self.datasets_dir.mkdir(parents=True, exist_ok=True)
        self.runner = Runner(self.engine)
        # downloads are written under the system temp dir, which Gradio serves from without allowed_paths
        self.exports_dir = Path(tempfile.mkdtemp(prefix="lora-studio-exports-"))
        atexit.register(shutil.rmtree, self.exports_dir, ignore_errors=True)

    @property
    def library(self):
        return self.engine.library

    # ---- base model -----------------------------------------------------------------------

    def availability(self, name: str) -> tuple[str, str]:
        return availability(name, self.weights, self.weights_for, self.probe)

    def base(self, name: str, progress: Callable[[str], None] | None = None, pin: bool = False):
        """The shared base `name`, loaded once (the first call per model loads it). pin: for a training
        run, see Engine.base (the runner releases the pin)."""
        if name not in PRESETS:
            raise ValueError(f"unknown base model {name!r}; choose one of {', '.join(CHOICES)}.")
        job = self.runner.busy()
        if job is not None and job.base_id != name:
            raise ValueError(f"the base model cannot change to {name} while {job.describe()} is training "
                             f"on {job.base_id}; pick {job.base_id}, or wait for the run to end.")
        weights = self.weights if name == self.weights_for else None
        model = self.engine.base(name, weights, progress, pin=pin)
        c, p = model.config, PRESETS[name]
        if weights and (c.n_layer, c.n_embd, c.n_head) != (p.n_layer, p.n_embd, p.n_head):
            if pin:
                self.engine.unpin_base(model)
            raise WeightsError(f"--weights {weights} holds a {c.n_layer}-layer width-{c.n_embd} GPT-2, not {name} "
                               f"({p.n_layer} layers, width {p.n_embd}); start with the matching --model.")
        return model

    def model_status(self, name: str) -> str:
        """Markdown: whether base `name` is available, and its size."""
        kind, text = self.availability(name)
        icon = f"<span class='dot {kind}'></span>"
        now = " · **loaded**" if self.loaded_base() == name else ""
        return f"{icon} {text}  \n<span class='muted'>{describe(name)}{now}</span>"

    def loaded_base(self) -> str | None:
        return self.engine.base_id if self.engine.model is not None else None

    # ---- datasets ---------------------------------------------------------------------------

    def dataset_path(self, name: str) -> Path:
        if not valid_name(name):
            raise ValueError(f"invalid dataset name {shown_name(name)}: use 1-64 letters, digits, '_', '.' or '-', "
                             f"starting with a letter or digit (not a Windows device name such as 'con').")
        p = self.datasets_dir / name
        if p.is_symlink() or not p.resolve().is_relative_to(self.datasets_dir):
            raise ValueError(f"dataset {name!r} is not inside the datasets folder.")
        return p

    def datasets(self) -> list[dict]:
        """Prepared datasets, newest first: name, token counts, sources."""
        out = []
        for d in sorted(self.datasets_dir.iterdir()) if self.datasets_dir.is_dir() else []:
            if not valid_name(d.name) or d.is_symlink() or not (d / "train_00000.npy").is_file():
                continue
            out.append({"name": d.name, "meta": read_dataset_meta(d), "mtime": d.stat().st_mtime})
        return sorted(out, key=lambda x: -x["mtime"])

    # ---- downloads --------------------------------------------------------------------------

    def export_folder(self) -> Path:
        """A fresh private folder for one download; folders older than an hour are removed."""
        now = time.time()
        for old in self.exports_dir.iterdir():
            try:
                if now - old.stat().st_mtime > 3600:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(prefix="x-", dir=self.exports_dir))


def user_of(request: gr.Request | None) -> str | None:
    """The signed-in user name (None without --auth)."""
    return getattr(request, "username", None) if request is not None else None


def friendly(fn):
    """Show user-facing errors (bad input, missing weights, a busy runner, a full disk) as a warning toast
    with the message, leaving the outputs as they were: never a traceback, never red error boxes on the form."""
    def report(e: Exception):
        text = str(e) or type(e).__name__
        if disk_full(e):
            text = f"not enough disk space ({e.strerror}); nothing was saved. Free some space and try again."
        gr.Warning(text[0].upper() + text[1:], duration=12, title="Cannot do that")
        return gr.skip()  # one skip() leaves every output unchanged

    def handle(e: Exception):
        if isinstance(e, USER_ERRORS) or (isinstance(e, OSError) and disk_full(e)):
            return report(e)
        raise e

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (*USER_ERRORS, OSError) as e:
                yield handle(e)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, OSError) as e:
            return handle(e)
    return wrapper
