"""Co-batched training: several runs share each micro-step on one base, and each run's losses and
adapter are the ones it gets alone (within 1e-5 in fp32), whoever joins, stops or fails beside it."""
from __future__ import annotations

import pytest
import torch

from core.lora.layers import adapter_state_dict, lora_parameters
from core.lora.config import LoraConfig
from core.model.weights import load_base
from core.train.loop import TrainLoop
from core.train.trainer import Trainer
from train_helpers import quick, train_solo

# different ranks, targets, batch sizes, sequence lengths, learning rates, accumulation, dropout, cadences
JOBS = {
    "a": (LoraConfig(r=4, alpha=8, targets=("attn.c_attn",)),
          quick(steps=4, lr=1e-2, batch_size=2, seq_len=16, grad_accum=1, eval_interval=2, checkpoint_interval=0,
                seed=1)),
    "b": (LoraConfig(r=8, alpha=32, targets=("attn.c_attn", "mlp.c_fc"), dropout=0.1),
          quick(steps=3, lr=5e-3, batch_size=3, seq_len=24, grad_accum=2, eval_interval=0, checkpoint_interval=2,
                seed=2)),
    "c": (LoraConfig(r=2, alpha=4, targets=("attn.c_proj", "mlp.c_proj")),
          quick(steps=5, lr=2e-2, batch_size=1, seq_len=32, grad_accum=3, eval_interval=1, checkpoint_interval=0,
                seed=3)),
}
TOL = 1e-5


def _trainer(model, ds, name, folder, **tcfg_changes):
    lcfg, tcfg = JOBS[name]
    if tcfg_changes:
        tcfg = type(tcfg).from_dict({**tcfg.to_dict(), **tcfg_changes})
    return Trainer(model, ds, lcfg, tcfg, name, folder / name)


def _losses(events, kind="step", key="loss"):
    return [(e["step"], e[key]) for e in events if e["type"] == kind]


def _same(got, want):
    assert [s for s, _ in got] == [s for s, _ in want]
    assert all(abs(g - w) <= TOL for (_, g), (_, w) in zip(got, want)), (got, want)


def _same_tensors(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=TOL, rtol=0)


@pytest.fixture(scope="module")
def alone(sample_ds, tmp_path_factory):
    """Each job trained alone on its own fresh base: its events and final adapter."""
    folder = tmp_path_factory.mktemp("alone")
    out = {}
    for name in JOBS:
        model = load_base("tiny", device="cpu")
        events = train_solo(_trainer(model, sample_ds, name, folder))
        assert events[-1]["type"] == "done"
        out[name] = (events, adapter_state_dict(model, name))
    return out


def _together(sample_ds, folder, names, before_step=None, **trainer_kw):
    """Run `names` co-batched on one base; before_step(i, co, trainers) may add, stop or break runs."""
    model = load_base("tiny", device="cpu")
    co, events, trainers = TrainLoop(model), {n: [] for n in JOBS}, {}
    for n in names:
        trainers[n] = _trainer(model, sample_ds, n, folder, **trainer_kw.get(n, {}))
        co.join(trainers[n], events[n].append)
    i = 0
    while co.live:
        if before_step is not None:
            before_step(i, co, trainers, events, model)
        co.step()
        i += 1
    return model, events, trainers


def test_the_jobs_train_their_adapters(alone):
    for name, (events, tensors) in alone.items():
        assert len(_losses(events)) == JOBS[name][1].steps
        # B starts at zero: a trained B is an adapter that changes the output
        assert all(v.abs().sum() > 0 for k, v in tensors.items() if k.endswith("lora_B.weight"))
    assert len({frozenset(t) for _, t in alone.values()}) == 3  # different targets: different key sets


def test_three_different_jobs_co_batched_equal_each_alone(alone, sample_ds, tmp_path):
    widths = []
    model, events, _ = _together(sample_ds, tmp_path, list(JOBS),
                                 before_step=lambda i, co, *_: widths.append(len(co.runs)))
    assert max(widths) == 3  # really together, not one after another
    for name in JOBS:
        want_events, want_tensors = alone[name]
        assert events[name][-1]["type"] == "done" and events[name][-1]["status"] == "finished"
        _same(_losses(events[name]), _losses(want_events))
        _same(_losses(events[name], "eval", "val_loss"), _losses(want_events, "eval", "val_loss"))
        _same_tensors(adapter_state_dict(model, name), want_tensors)


def test_a_job_joining_mid_run_and_one_stopping_leave_the_others_unchanged(alone, sample_ds, tmp_path):
    def before_step(i, co, trainers, events, model):
        if i == 3:  # b joins after three shared micro-steps
            trainers["b"] = _trainer(model, sample_ds, "b", tmp_path)
            co.join(trainers["b"], events["b"].append)
        if trainers["c"].step == 2:
            trainers["c"].stop.set()

    model, events, trainers = _together(sample_ds, tmp_path, ["a", "c"], before_step)
    for name in ("a", "b"):
        _same(_losses(events[name]), _losses(alone[name][0]))
        _same_tensors(adapter_state_dict(model, name), alone[name][1])
    done = events["c"][-1]
    assert done["type"] == "done" and done["status"] == "stopped" and done["step"] == 2
    _same(_losses(events["c"]), _losses(alone["c"][0])[:2])


def test_a_job_hitting_nan_leaves_alone_and_the_others_go_on(alone, sample_ds, tmp_path):
    def before_step(i, co, trainers, events, model):
        if trainers["b"].step == 1 and trainers["b"].outcome is None:
            with torch.no_grad():
                for p in lora_parameters(model, "b"):
                    p.fill_(float("nan"))

    model, events, _ = _together(sample_ds, tmp_path, list(JOBS), before_step)
    err = events["b"][-1]
    assert err["type"] == "error" and err["kind"] == "nan" and err["step"] == 2
    for name in ("a", "c"):
        _same(_losses(events[name]), _losses(alone[name][0]))
        _same_tensors(adapter_state_dict(model, name), alone[name][1])


def test_out_of_memory_pushes_out_the_newest_job_which_rejoins_exactly_where_it_was(alone, sample_ds, tmp_path):
    state = {"fail": True, "out": None}

    def before_step(i, co, trainers, events, model):
        if len(co.runs) == 3 and state["fail"]:  # all three in the shared step (opened, not validating)
            real = model.hidden

            def oom_once(*a, **kw):
                model.hidden = real
                state["fail"] = False
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            model.hidden = oom_once
        if state.get("at") == i - 4:  # the pushed-out job comes back four steps later
            co.rejoin(state["out"], events["c"].append)

    model = load_base("tiny", device="cpu")
    co, events, trainers = TrainLoop(model), {n: [] for n in JOBS}, {}
    for n in JOBS:
        trainers[n] = _trainer(model, sample_ds, n, tmp_path)
        co.join(trainers[n], events[n].append)
    i = 0
    while co.live:
        before_step(i, co, trainers, events, model)
        out = co.step()
        if out:
            state["out"], state["at"] = out[0], i
            assert out[0] is trainers["c"] and len(co.runs) == 2  # the newest left, the rest go on
        i += 1
    assert state["out"] is trainers["c"]
    for name in JOBS:
        _same(_losses(events[name]), _losses(alone[name][0]))
        _same_tensors(adapter_state_dict(model, name), alone[name][1])
