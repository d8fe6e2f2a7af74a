"""Helpers for the studio tests, which call the tab handlers directly (no browser) on the tiny model:
prepare the sample dataset, start and finish a training run with fast settings, wait for a condition,
and assert that a refused input changes none of the studio's state. The `studio` fixture is in conftest.py.

Also imported outside pytest (test_faults.py runs `_prepare` and `_start` in a child process), so this
module needs nothing from pytest's fixtures."""
from __future__ import annotations

import dataclasses
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from adapter_helpers import base_tensors, listing
from core.lora.layers import adapter_names
from studio.context import friendly
from studio.tabs import data, train

# the Train tab's settings for runs that take seconds on the tiny model
FAST = dict(targets=["attn.c_attn", "mlp.c_fc"], r=4, alpha=8, dropout=0.0, lr=2e-3, batch=2, accum=1,
            seq_len=32, eval_interval=5, seed=7, prompt="Ahoy")


def _prepare(studio, name="pirates", sample="pirate_recipes"):
    text, _, state = data.sample_text(sample)
    state, _, _ = data.analyze(state, text, 0.9)
    return data.prepare(studio, state, text, 0.9, name)


def _start(studio, name, steps, dataset="pirates", user=None, **over):
    a = {**FAST, **over}
    return train.start(studio, _form(model="tiny", dataset=dataset, name=name, steps=steps, **a), user=user)


def _form(r=None, **fields) -> train.TrainForm:
    """The Train tab's form from FAST-style settings (`r` is the rank)."""
    return train.TrainForm(**fields, **({} if r is None else {"rank": r}))


def _wait_for(pred, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _train(studio, name, steps=6, **kw):
    _start(studio, name, steps, **kw)
    snap = studio.runs.wait(180)
    assert snap["state"] == "finished", snap["message"]
    return snap


# ---- "changing no state" -------------------------------------------------------------------

def _files(folder: Path) -> list[tuple[str, ...]]:
    return sorted(tuple(p.relative_to(folder).parts) for p in folder.rglob("*") if p.name != ".lock")


def _state(studio) -> dict:
    model = studio.engine.model
    snap = studio.runs.snapshot()
    return {"datasets": _files(studio.datasets_dir), "library": listing(studio.library),
            "entries": [e.to_dict() for e in studio.library.list()],
            "base": studio.engine.base_id if model is not None else None,
            "adapters": sorted(adapter_names(model)) if model is not None else None,
            "engine slots": studio.engine.loaded(),
            "job": None if snap is None else (snap["id"], snap["state"], snap["progress"].get("step"))}


@contextmanager
def unchanged(studio):
    """Assert that the block changes none of the studio's state (base weights compared bit for bit)."""
    before = _state(studio)
    weights = base_tensors(studio.engine.model) if studio.engine.model is not None else None
    yield
    assert _state(studio) == before
    if weights is not None:
        after = base_tensors(studio.engine.model)
        assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)


def refused(studio, exc, pattern, fn, *args, **kw) -> str:
    """fn(*args) raises `exc` matching `pattern`, changes nothing, and the UI shows it as one short toast."""
    with unchanged(studio):
        with pytest.raises(exc, match=pattern) as info:
            out = fn(*args, **kw)
            if hasattr(out, "__next__"):  # a generator handler fails on its first step
                next(out)
    msg = str(info.value)
    assert "Traceback" not in msg and len(msg) < 400, msg
    with unchanged(studio), pytest.warns(UserWarning) as toasts:  # the same error through the UI wrapper: a toast
        out = friendly(fn)(*args, **kw)
        if hasattr(out, "__next__"):
            next(out)
    shown = " ".join(str(t.message) for t in toasts)
    for typed in _texts(args, kw):  # the user's own input echoed back ('/tmp/x' is no name) is not the server's
        shown = shown.replace(typed, "")
    assert_no_server_path(studio, shown)
    return msg


def _texts(args, kw) -> list[str]:
    """The strings a handler was given, inside lists, dicts and forms too, longest first."""
    out, todo = [], [*args, *kw.values()]
    while todo:
        x = todo.pop()
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif dataclasses.is_dataclass(x):  # a form (CompareForm, TrainForm)
            todo.extend(vars(x).values())
    return sorted(out, key=len, reverse=True)


def assert_no_server_path(studio, text: str) -> None:
    """A message a page shows names no folder of the server (library, datasets, temp dir)."""
    for root in (studio.library.root, studio.datasets_dir, Path(tempfile.gettempdir()).resolve(), Path.home()):
        assert str(root) not in text, text


