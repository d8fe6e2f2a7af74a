"""The training loop on the tiny model: learning, events, stop, checkpoints, resume, failures."""
from __future__ import annotations

import json
import math
import re
import threading

import pytest
import torch
from safetensors import safe_open

from adapter_helpers import base_tensors
from train_helpers import quick, train_solo, train_to_end
from core.adapters import run_record
from core.train import data
from core.model import tokenizer
from core.lora.config import LoraConfig
from core.train.config import TrainConfig
from core.lora.layers import adapter_names, adapter_state_dict, add_adapter, lora_parameters
from core.adapters.library import checkpoint_dirs
from core.train.trainer import STATE, Trainer, find_checkpoint, lr_at, TrainingError
from core.model.weights import load_base

LORA_KEY = re.compile(r"^base_model\.model\.transformer\.h\.\d+\.attn\.c_attn\.lora_[AB]\.weight$")




def run_all(trainer) -> list[dict]:
    return train_solo(trainer)


def of(events, kind):
    return [e for e in events if e["type"] == kind]


# ---- schedule and settings ------------------------------------------------------------

def test_lr_warms_up_linearly_then_decays_by_cosine_to_ten_percent():
    t = TrainConfig(steps=100, lr=1e-3, warmup_steps=10)
    assert lr_at(0, t) == pytest.approx(1e-4) and lr_at(9, t) == pytest.approx(1e-3)
    decay = [lr_at(s, t) for s in range(10, 101)]
    assert decay[0] == pytest.approx(1e-3) and decay[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(55, t) == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # halfway through the decay
    assert TrainConfig(steps=500).warmup() == 50 and TrainConfig(steps=30).warmup() == 3


@pytest.mark.parametrize("field,value,msg", [
    ("steps", 0, "steps"), ("lr", 0.0, "learning rate"), ("lr", -1e-3, "learning rate"),
    ("lr", float("nan"), "learning rate"), ("lr", float("inf"), "learning rate"), ("batch_size", 0, "batch size"),
    ("seq_len", 0, "sequence length"), ("seq_len", 1025, "sequence length"), ("grad_accum", 0, "accumulation"),
    ("grad_clip", -1.0, "clip"), ("warmup_steps", 9, "warmup"), ("steps", 2.5, "steps"),
])
def test_train_config_rejects_bad_settings_with_a_message(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**{"steps": 8, field: value}).validate()


def test_sequence_longer_than_the_models_context_is_refused(tiny, sample_ds, tmp_path):
    from dataclasses import replace
    tiny.config = replace(tiny.config, block_size=64)
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        Trainer(tiny, sample_ds, LoraConfig(), quick(seq_len=128), "a", tmp_path / "run")
    with pytest.raises(ValueError, match="rank"):
        Trainer(tiny, sample_ds, LoraConfig(r=0), quick(), "a", tmp_path / "run")


# ---- learning -------------------------------------------------------------------------

def test_training_lowers_the_validation_loss_and_changes_only_lora_weights(tiny, tmp_path):
    ds = data.prepare([data.SAMPLES_DIR / "brainrot.txt"], tmp_path / "ds")
    before = base_tensors(tiny)
    cfg = quick(steps=30, grad_accum=1, eval_interval=10, checkpoint_interval=10)
    events = run_all(Trainer(tiny, ds, LoraConfig(), cfg, "brainrot", tmp_path / "run", base_id="tiny"))
    evals = of(events, "eval")
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(evals[-1]["val_loss"]))
    after = base_tensors(tiny)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is bit-identical
    assert all(p.abs().sum() > 0 for p in lora_parameters(tiny, "brainrot"))  # B moved off zero
    assert "brainrot" in adapter_names(tiny)  # left loaded for generation


def test_events_are_plain_values_with_the_documented_fields(tiny, sample_ds, tmp_path):
    events = run_all(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=4, sample_prompts=("no cap",),
                                                                  sample_tokens=5), "a", tmp_path / "run"))
    json.dumps(events)  # plain python values only: safe to pass between threads and to the UI
    assert [e["type"] for e in events][:3] == ["start", "eval", "sample"]
    assert events[-1]["type"] == "done"
    steps = of(events, "step")
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        assert {"step", "steps", "loss", "lr", "grad_norm", "step_time", "tokens_per_sec", "eta"} <= e.keys()
        assert e["tokens_per_sec"] > 0 and e["eta"] >= 0 and e["steps"] == 4
    assert steps[-1]["eta"] == 0
    assert of(events, "sample")[0]["samples"][0]["prompt"] == "no cap"
    done = events[-1]
    assert done["status"] == "finished" and done["step"] == 4 and done["val_loss"] == of(events, "eval")[-1]["val_loss"]
    meta = json.loads((tmp_path / "run" / "studio.json").read_text())
    assert meta["status"] == "finished" and meta["steps"] == 4 and meta["base_model"] == ""
    assert meta["dataset"]["sha256"] == sample_ds.sha256 and meta["training"]["lr"] == 1e-2
    history = list(run_record.history(tmp_path / "run"))
    assert [h["step"] for h in history] == [1, 2, 3, 4] and "val_loss" in history[3]
    assert meta["val_loss"] == done["val_loss"] and meta["train_loss"] == steps[-1]["loss"]


def test_the_seeds_356_token_example_trains_end_to_end(tiny, tmp_path):
    ids = tokenizer.encode(data.load_sample("brainrot"))[:356]
    ds = data.prepare(text=tokenizer.decode(ids), output=tmp_path / "ds")
    assert (len(ds.train), len(ds.val)) == (320, 36)
    # the seed's micro-batch (4 x 128): 320 training tokens hold a block; the 36 validation tokens are one window
    events = run_all(Trainer(tiny, ds, LoraConfig(), quick(steps=10, batch_size=4, seq_len=128, grad_accum=1,
                                                           eval_interval=5), "seed356", tmp_path / "run"))
    assert not of(events, "info")
    evals = of(events, "eval")
    assert evals[0]["val_tokens"] == 35 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert events[-1]["status"] == "finished"


def test_data_shorter_than_a_block_trains_with_a_smaller_block_and_says_so(tiny, tmp_path):
    ds = data.prepare(text=" ".join(["word"] * 70))
    events = run_all(Trainer(tiny, ds, LoraConfig(), quick(steps=2, seq_len=128), "short", tmp_path / "run"))
    assert of(events, "start")[0]["seq_len"] == len(ds.train) - 1
    assert "reduced to" in of(events, "info")[0]["message"]
    assert events[-1]["status"] == "finished"


def test_training_uses_its_own_route_and_leaves_other_adapters_alone(tiny, sample_ds, tmp_path):
    add_adapter(tiny, "other", LoraConfig(r=4))
    with torch.no_grad():
        for p in lora_parameters(tiny, "other"):
            p.normal_()
    other = {k: v.clone() for k, v in adapter_state_dict(tiny, "other").items()}
    run_all(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=3), "mine", tmp_path / "run"))
    assert all(torch.equal(other[k], v) for k, v in adapter_state_dict(tiny, "other").items())
    assert set(adapter_names(tiny)) == {"other", "mine"}


def test_an_existing_run_folder_is_never_overwritten(tiny, sample_ds, tmp_path):
    run_all(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=1), "a", tmp_path / "run"))
    with pytest.raises(ValueError, match="already holds a training run"):
        Trainer(tiny, sample_ds, LoraConfig(), quick(steps=1), "b", tmp_path / "run")


def test_large_micro_batches_train_the_loss_in_pieces_with_the_same_result(sample_ds, tmp_path, monkeypatch):
    from core.model import loss
    V = load_base("tiny", "cpu").config.vocab_size
    assert loss.piece_tokens(4 * 128, V) == 4 * 128  # the seed's micro-batch: logits whole (fastest)
    assert loss.piece_tokens(16 * 1024, V) == 2048  # 3.3 GB of logits: 8 pieces
    whole = run_all(Trainer(load_base("tiny", "cpu"), sample_ds, LoraConfig(), quick(steps=3), "w", tmp_path / "w"))
    # at this tiny size: 16 tokens' logits fit, so a micro-batch of 2 x 32 trains in 4 pieces of 16
    monkeypatch.setattr(loss, "LOGITS_BUDGET", 16 * V * 4)
    monkeypatch.setattr(loss, "MIN_PIECE", 16)
    ce_sum, pieces = loss.ce_sum, []

    def counted(h, t, head):
        if torch.is_grad_enabled():
            pieces.append(h.shape[0])
        return ce_sum(h, t, head)
    monkeypatch.setattr(loss, "ce_sum", counted)
    cut = run_all(Trainer(load_base("tiny", "cpu"), sample_ds, LoraConfig(), quick(steps=3), "p", tmp_path / "p"))
    assert pieces and set(pieces) == {16}  # every training loss in pieces (recomputed in the backward too)
    for kind, key in (("step", "loss"), ("eval", "val_loss")):
        assert len(of(cut, kind)) == len(of(whole, kind))
        for a, b in zip(of(whole, kind), of(cut, kind)):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
    a, b = _adapter(tmp_path / "w"), _adapter(tmp_path / "p")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the pieces' gradients are the whole one's


# ---- chunked running (ZeroGPU: each chunk in a fresh forked worker) ------------------------

CHUNKED = dict(steps=7, eval_interval=2, checkpoint_interval=4, grad_accum=2)
CHUNKED_LORA = LoraConfig(r=4, dropout=0.1, loraplus_lr_ratio=4.0)  # dropout: its RNG travels too


def _chunk(sample_ds, out_dir, state, **limits):
    """One chunk on a base loaded here (in a worker: nothing of the parent's model or modules comes back)."""
    from core.train.loop import train_chunk
    trainer = Trainer(load_base("tiny", "cpu"), sample_ds, CHUNKED_LORA, quick(**CHUNKED), "run", out_dir,
                      resume=state)
    return train_chunk(trainer, **limits)


def _chunk_in_worker(*args, **limits):
    torch.set_num_threads(1)  # a forked child cannot use the OpenMP threads its parent started (it hangs)
    return _chunk(*args, **limits)


def _adapter(run):
    from safetensors.torch import load_file
    return load_file(str(run / "adapter_model.safetensors"))


@pytest.mark.parametrize("where", ["forked", "same-process"])
def test_a_run_in_chunks_equals_the_run_at_once(sample_ds, tmp_path, where):
    import multiprocessing
    import pickle
    whole = _chunk(sample_ds, tmp_path / "whole", None)
    assert whole.outcome == "finished" and whole.state is None
    chunks, state = [], None
    for limits in ({"max_steps": 3}, {"max_seconds": 0.0}, {"max_steps": 3}, {}):  # 3, 1, 3 steps
        if where == "forked":
            with multiprocessing.get_context("fork").Pool(1) as pool:
                chunk = pool.apply(_chunk_in_worker, (sample_ds, tmp_path / "cut", state), limits)
        else:
            chunk = _chunk(sample_ds, tmp_path / "cut", pickle.loads(pickle.dumps(state)), **limits)
        chunks.append(chunk)
        state = chunk.state
        if state is None:
            break
    assert [c.outcome for c in chunks] == [None, None, "finished"]
    assert [[e["step"] for e in of(c.events, "step")] for c in chunks] == [[1, 2, 3], [4], [5, 6, 7]]
    cut = [e for c in chunks for e in c.events]
    for kind, key in (("step", "loss"), ("eval", "val_loss")):
        assert [e["step"] for e in of(cut, kind)] == [e["step"] for e in of(whole.events, kind)]
        for a, b in zip(of(cut, kind), of(whole.events, kind)):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (kind, a["step"])
    a, b = _adapter(tmp_path / "whole"), _adapter(tmp_path / "cut")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert [h["step"] for h in run_record.history(tmp_path / "cut")] == list(range(1, 8))
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["step_000004", "step_000007"]


def test_a_chunk_state_holds_only_plain_data_and_cpu_tensors(tiny, sample_ds, tmp_path):
    import pickle
    from core.train.loop import train_chunk
    chunk = train_chunk(Trainer(tiny, sample_ds, CHUNKED_LORA, quick(**CHUNKED), "run", tmp_path / "run"),
                        max_steps=1)
    state = chunk.state
    tensors = list(state.weights.values()) + [state.torch_rng] + [
        t for s in state.optimizer["state"].values() for t in s.values()]
    assert state.step == 1 and all(t.device.type == "cpu" for t in tensors)
    kept = pickle.loads(pickle.dumps(state))
    with torch.no_grad():  # the state is a copy: training on does not change it
        for p in lora_parameters(tiny, "run"):
            p.add_(1.0)
    assert all(torch.equal(kept.weights[k], v) for k, v in state.weights.items())


# ---- stop -----------------------------------------------------------------------------

def test_stop_from_another_thread_ends_within_one_step_and_saves(tiny, sample_ds, tmp_path):
    events = []
    trainer = Trainer(tiny, sample_ds, LoraConfig(), quick(steps=500, grad_accum=4), "bg", tmp_path / "run")

    def on_event(ev):
        events.append(ev)
        if ev["type"] == "step" and ev["step"] == 3:
            trainer.stop.set()

    worker = threading.Thread(target=train_solo, args=(trainer, on_event))
    worker.start()
    worker.join(timeout=120)
    done = events[-1]
    assert done["type"] == "done" and done["status"] == "stopped"
    assert done["step"] in (3, 4)  # the step in flight may finish; no further one starts
    meta = json.loads((tmp_path / "run" / "studio.json").read_text())
    assert meta["status"] == "stopped" and meta["steps"] == done["step"]
    ck = find_checkpoint(tmp_path / "run")
    assert ck.step == done["step"] and (ck.path / STATE).is_file()
    assert "bg" in adapter_names(tiny)


def test_stop_is_checked_between_micro_steps(tiny, sample_ds, tmp_path, monkeypatch):
    trainer = Trainer(tiny, sample_ds, LoraConfig(), quick(steps=50, grad_accum=4), "mid", tmp_path / "run")
    hidden, calls = tiny.hidden, []

    def counting_hidden(*a, **kw):
        if torch.is_grad_enabled():  # training micro-steps only (not evaluation)
            calls.append(1)
            if len(calls) == 4 * 3 + 2:  # the 2nd micro-step of step 4
                trainer.stop.set()
        return hidden(*a, **kw)

    monkeypatch.setattr(tiny, "hidden", counting_hidden)
    events = run_all(trainer)
    assert events[-1]["status"] == "stopped" and events[-1]["step"] == 3  # the partial step 4 is dropped
    assert len(calls) == 14  # no micro-step ran after the flag
    assert of(events, "checkpoint")[-1]["path"].endswith("step_000003")


# ---- resume ---------------------------------------------------------------------------

@pytest.mark.parametrize("same_model", [False, True], ids=["fresh-process", "same-model"])
def test_resume_reproduces_the_uninterrupted_run(tiny, sample_ds, tmp_path, monkeypatch, same_model):
    cfg = quick(steps=8, eval_interval=4, checkpoint_interval=0)
    full = run_all(Trainer(load_base("tiny", "cpu"), sample_ds, LoraConfig(), cfg, "run", tmp_path / "full"))
    full_losses = {e["step"]: e["loss"] for e in of(full, "step")}

    trainer = Trainer(tiny, sample_ds, LoraConfig(), cfg, "run", tmp_path / "cut")
    hidden, calls = tiny.hidden, []

    def stop_mid_step_5(*a, **kw):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 2 * 4 + 1:  # one micro-batch of step 5 has been drawn
                trainer.stop.set()
        return hidden(*a, **kw)

    monkeypatch.setattr(tiny, "hidden", stop_mid_step_5)
    first = run_all(trainer)
    monkeypatch.undo()
    assert first[-1]["status"] == "stopped" and first[-1]["step"] == 4

    model = tiny if same_model else load_base("tiny", "cpu")
    second = run_all(Trainer(model, sample_ds, None, None, "run", tmp_path / "cut", resume=tmp_path / "cut"))
    assert of(second, "start")[0]["step"] == 4 and not any(e["step"] == 0 for e in of(second, "eval"))
    resumed = {e["step"]: e["loss"] for e in of(first + second, "step")}
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(resumed[step] - full_losses[step]) <= 1e-4, step
    assert second[-1]["val_loss"] == pytest.approx(full[-1]["val_loss"], abs=1e-4)
    meta = json.loads((tmp_path / "cut" / "studio.json").read_text())
    assert meta["status"] == "finished" and [h["step"] for h in run_record.history(tmp_path / "cut")] == list(range(1, 9))


def test_resume_checks_the_dataset_and_the_step_count(tiny, sample_ds, tmp_path):
    run_all(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=2), "r", tmp_path / "run"))
    other = data.prepare(text="a different text entirely " * 30)
    fresh = load_base("tiny", "cpu")
    with pytest.raises(ValueError, match="not the dataset the run was trained on"):
        Trainer(fresh, other, None, None, "r", tmp_path / "run", resume=tmp_path / "run")
    with pytest.raises(ValueError, match="more steps"):
        Trainer(fresh, sample_ds, None, None, "r", tmp_path / "run", resume=tmp_path / "run")
    more = Trainer(fresh, sample_ds, None, quick(steps=3), "r", tmp_path / "run", resume=tmp_path / "run")
    assert [e["step"] for e in of(run_all(more), "step")] == [3]
    with pytest.raises(ValueError, match="no checkpoint"):
        find_checkpoint(tmp_path)


# ---- checkpoints ----------------------------------------------------------------------

def test_checkpoints_hold_only_adapter_tensors(tiny, sample_ds, tmp_path):
    run_all(Trainer(tiny, sample_ds, LoraConfig(r=8), quick(steps=8, checkpoint_interval=2, keep_checkpoints=2),
                    "ck", tmp_path / "run"))
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert folders == ["step_000006", "step_000008"]  # the newest two are kept
    n_lora = sum(p.numel() for p in lora_parameters(tiny, "ck"))
    for ck in (tmp_path / "run" / "checkpoints").iterdir():
        assert sorted(p.name for p in ck.iterdir()) == sorted(
            ["adapter_model.safetensors", "adapter_config.json", "studio.json", "history.jsonl", STATE])
        with safe_open(str(ck / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
            assert keys and all(LORA_KEY.match(k) for k in keys)
            assert sum(f.get_tensor(k).numel() for k in keys) == n_lora
        assert (ck / "adapter_model.safetensors").stat().st_size < n_lora * 4 + 4096  # fp32, nothing else
        state = torch.load(ck / STATE, weights_only=True)  # no pickled code needed to read it
        assert set(state) == {"step", "optimizer", "np_rng", "torch_rng", "start_val_loss"}
        moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
        assert sum(t.numel() for t in moments) == 2 * n_lora  # AdamW's two moments of the LoRA weights only


# ---- failures -------------------------------------------------------------------------

def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny, sample_ds, tmp_path):
    poison = {"on": False}
    hook = tiny.transformer.ln_f.register_forward_hook(lambda m, i, out: out * float("nan") if poison["on"] else out)
    weights_after_4 = {}

    def on_event(ev):
        if ev["type"] == "step" and ev["step"] == 4:
            weights_after_4.update({k: v.clone() for k, v in adapter_state_dict(tiny, "nan").items()})
            poison["on"] = True
    try:
        events = train_solo(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=20, checkpoint_interval=3), "nan",
                                    tmp_path / "run"), on_event)
    finally:
        hook.remove()
    err = events[-1]
    assert err["type"] == "error" and err["kind"] == "nan" and err["step"] == 5
    assert "NaN at step 5" in err["message"] and "lower learning rate" in err["message"]
    assert err["checkpoint"].endswith("step_000003") and "step_000003" in err["message"]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_000003"]
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert find_checkpoint(tmp_path / "run").step == 3
    # the bad step was not applied: the adapter in memory is still the step-4 one
    assert all(torch.equal(weights_after_4[k], v) for k, v in adapter_state_dict(tiny, "nan").items())
    # in the foreground (the CLI) the same failure is an exception with that message
    hook = tiny.transformer.ln_f.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(TrainingError, match="NaN at step 1"):
        train_to_end(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=2), "nan2", tmp_path / "run2"))
    hook.remove()


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
], ids=["cuda", "cpu"])
def test_out_of_memory_becomes_a_message_naming_the_settings_to_lower(tiny, sample_ds, tmp_path, monkeypatch, error):
    hidden = tiny.hidden

    def oom_when_training(*a, **kw):
        if torch.is_grad_enabled():
            raise error
        return hidden(*a, **kw)

    monkeypatch.setattr(tiny, "hidden", oom_when_training)
    events = run_all(Trainer(tiny, sample_ds, LoraConfig(r=8), quick(batch_size=4, seq_len=32), "oom",
                             tmp_path / "run"))
    err = events[-1]
    assert err["type"] == "error" and err["kind"] == "oom"
    for words in ("out of memory", "batch size 4", "sequence length 32", "rank 8", "smaller model"):
        assert words in err["message"]
    assert all(p.grad is None for p in lora_parameters(tiny, "oom"))


def test_unexpected_errors_are_raised_and_the_runs_of_the_step_end_as_failed(tiny, sample_ds, tmp_path,
                                                                             monkeypatch):
    from core.train.loop import TrainLoop
    trainer = Trainer(tiny, sample_ds, LoraConfig(), quick(), "x", tmp_path / "a")
    loop, events = TrainLoop(tiny), []
    loop.join(trainer, events.append)

    hidden = tiny.hidden

    def broken_when_training(*a, **kw):  # the shared micro-step's forward, not the run's first validation
        if torch.is_grad_enabled():
            raise ZeroDivisionError("bug")
        return hidden(*a, **kw)

    monkeypatch.setattr(tiny, "hidden", broken_when_training)
    with pytest.raises(ZeroDivisionError, match="bug"):  # the scheduler reports it to every job of the step
        loop.run()
    assert trainer.outcome == "failed" and loop.runs == []
    assert all(p.grad is None for p in lora_parameters(tiny, "x"))
