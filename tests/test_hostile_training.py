"""Issue 10, training side: settings a hostile student can type, training runs too large for the
machine, Stop during evaluation, and the shared base switching under a starting run."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import torch

from core.train import data, trainer as train
from core import device as core_device
from core.lora.config import LoraConfig
from core.model.config import PRESETS
from core.train.config import TrainConfig
from core.engine import BaseInUse, Engine
from core.train.estimate import MemoryLimitError, estimate_training, parse_size
from core.generate.sampling import SamplingConfig
from core.lora.layers import adapter_names
from core.train.trainer import Trainer, find_checkpoint
from core.train.evaluate import EVAL_TOKENS, Stopped, evaluate_models
from core.model.weights import load_base
import train_helpers
from train_helpers import train_solo, train_to_end


def quick(**kw) -> TrainConfig:
    return train_helpers.quick(**{"steps": 4, "grad_accum": 1, "eval_interval": 2, "checkpoint_interval": 2, **kw})


# ---- item 11/12: every numeric setting is bounded, with a message -------------------------------

@pytest.mark.parametrize("field,value,msg", [
    ("alpha", 1e300, r"alpha must be a positive number \(got 1e\+300\); use at most 1024"),
    ("alpha", float("inf"), "alpha must be a positive number"), ("alpha", float("nan"), "alpha must be a positive"),
    ("alpha", True, "alpha must be a positive number"), ("alpha", "16", "alpha must be a positive number"),
    ("dropout", float("nan"), r"dropout must be in \[0, 1\) \(got nan\)"), ("dropout", "0.1", "dropout must be"),
    ("r", True, "rank must be a whole number"), ("r", 8.0, "rank must be a whole number"),
    ("targets", "attn.c_attn", "targets must be a list"),
    ("rank_pattern", {"h.0.attn.\ud800": 4}, "each key must be a module name or regex"),  # no page could show it
])
def test_lora_settings_outside_sane_ranges_are_refused(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        LoraConfig(**{field: value}).validate()


@pytest.mark.parametrize("field,value,msg", [
    ("steps", float("inf"), r"steps must be a whole number from 1 to 1000000 \(got inf\)"),
    ("steps", 10**400, "steps must be a whole number from 1 to 1000000"),
    ("lr", 1e300, "learning rate must be a number > 0 and <= 1"),
    ("min_lr_ratio", float("nan"), r"min lr ratio must be in \[0, 1\]"),
    ("grad_clip", 1e300, "gradient clip must be a number from 0 to 1000"),
    ("weight_decay", 1e300, "weight decay must be a number from 0 to 10"),
    ("weight_decay", "0.1", "weight decay must be a number"),
    ("eval_interval", 10**12, "eval interval must be a whole number from 0 to 1000000"),
    ("eval_max_batches", 10**9, "eval max batches must be a whole number from 1 to 10000"),
    ("checkpoint_interval", 10**12, "checkpoint interval must be a whole number from 0 to 1000000"),
    ("keep_checkpoints", 10**12, "checkpoints to keep must be a whole number from 0 to 1000"),
    ("seed", 2**64, r"seed must be a whole number from 0 to 9223372036854775807 \(got 18446744073709551616\)"),
    ("seed", -1, "seed must be a whole number"), ("batch_size", True, "batch size must be a whole number"),
    ("sample_prompts", ("\ud800 hi",), "sample prompt 1 holds invalid Unicode \\(a lone surrogate, U\\+D800\\) at character 1"),
    ("sample_prompts", ("x" * 5000,), "sample prompt 1 is 5,000 characters long; the limit is 4,000"),
    ("sample_prompts", ("a",) * 9, "at most 8 sample prompts"),
    ("cuda_graphs", "yes", "cuda graphs must be true or false"),
])
def test_train_settings_outside_sane_ranges_are_refused(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**{field: value}).validate()


def test_huge_alpha_is_refused_before_the_run_touches_the_model(tiny, sample_ds, tmp_path):
    with pytest.raises(ValueError, match="alpha must be a positive number .*use at most 1024"):
        Trainer(tiny, sample_ds, LoraConfig(alpha=1e300), quick(), "a", tmp_path / "run")
    assert adapter_names(tiny) == [] and not (tmp_path / "run").exists()


@pytest.mark.parametrize("training,msg", [
    ([1, 2], "training settings must be a JSON object"),
    ({"steps": "many"}, "steps must be a whole number"),
    ({"steps": float("inf")}, "steps must be a whole number"),
    ({"sample_prompts": 5}, "sample prompts must be a list of texts"),
    ({"lr": [1]}, "learning rate must be a number"),
])
def test_train_config_from_garbage_dicts_raises_a_clear_value_error(training, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig.from_dict(training)


def test_lora_config_from_garbage_dicts_raises_a_clear_value_error():
    with pytest.raises(ValueError, match="LoRA settings must be a JSON object"):
        LoraConfig.from_dict("r=8")
    with pytest.raises(ValueError, match="alpha must be a positive number .*use at most 1024"):
        LoraConfig.from_dict({"r": 8, "alpha": 1e308, "targets": ["attn.c_attn"]})
    assert LoraConfig.from_dict({"r": 4, "alpha": 8, "dropout": 0, "targets": ["attn.c_attn"]}) == \
        LoraConfig(r=4, alpha=8, targets=("attn.c_attn",))


@pytest.mark.parametrize("poison", [
    '{"steps": 1e400, "name": "x", "lora": {}, "training": {}}',  # json reads 1e400 as inf: int() overflows
    "[" * 100_000 + "]" * 100_000,  # RecursionError in json
    '{"steps": 2, "name": "x", "lora": {"r": 8, "alpha": 1e300, "targets": ["attn.c_attn"]}, "training": {}}',
    '{"steps": 2, "name": "x", "lora": {"r": 8, "targets": ["attn.c_attn"]}, "training": {"seed": 1e400}}',
], ids=["infinite-steps", "deep-nesting", "huge-alpha", "infinite-seed"])
def test_a_damaged_checkpoint_is_refused_with_a_message(tmp_path, poison):
    ck = tmp_path / "run" / "checkpoints" / "step_000002"
    ck.mkdir(parents=True)
    (ck / train.STATE).write_bytes(b"x")
    (ck / "studio.json").write_text(poison)
    with pytest.raises(ValueError, match="is missing or damaged .*resume from another checkpoint"):
        find_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("field,value,msg", [
    ("seed", 2**64, r"seed must be a whole number from 0 to 9223372036854775807"),
    ("seed", -5, "seed must be a whole number"), ("seed", 1.5, "seed must be a whole number"),
    ("temperature", float("inf"), "temperature must be a number from 0 to 5"),
    ("temperature", float("nan"), "temperature must be a number from 0 to 5"),
    ("top_k", 1e300, "top-k must be a whole number from 0 to 50257"),
    ("top_k", True, "top-k must be a whole number"),
    ("top_p", float("nan"), r"top-p must be a number in \(0, 1\]"),
    ("max_new_tokens", True, "max new tokens must be a whole number from 1 to 1024"),
])
def test_sampling_settings_outside_sane_ranges_are_refused(field, value, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingConfig(**{field: value}).validate()


def test_compare_with_a_64_bit_seed_says_what_is_wrong(tmp_path):
    eng = Engine("cpu", tmp_path / "lib")
    eng.base("tiny")
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to"):
        eng.compare("Hi", [None], SamplingConfig(seed=2**64, max_new_tokens=2))


# ---- item 2: the memory cap, the evaluation window, Stop during evaluation -------------------

GIANT = dict(batch_size=4096, seq_len=128)  # tiny at 4096 x 128: the estimate is tens of GB


def test_parse_size():
    assert parse_size("8GB") == 8 * 2**30 and parse_size("512mb") == 512 * 2**20
    assert parse_size("1.5 GiB") == int(1.5 * 2**30) and parse_size("4096") == 4096
    for bad in ("lots", "-1GB", "0", "inf GB", "1e400"):
        with pytest.raises(ValueError, match="memory size"):
            parse_size(bad)


def test_the_estimate_counts_the_logits_the_trainer_really_holds():
    """The estimate follows the loss's one rule (core.model.loss): logits kept whole below LOGITS_BUDGET,
    else in pieces of 1/8 of the tokens; and evaluation's rows of whole logits."""
    from core.model import loss
    V = PRESETS["gpt2"].vocab_size
    # gpt2 16 x 128: 2,048 tokens' logits stay whole (not one 256-token piece)
    assert loss.piece_tokens(16 * 128, V) == 16 * 128
    est = estimate_training(PRESETS["gpt2"], LoraConfig(), TrainConfig(batch_size=16, seq_len=128), "cpu")
    assert est.logits_bytes >= 16 * 128 * V * 4 * 2  # fp32 logits + log-softmax
    # tiny 8 x 1024: training runs in 1,024-token pieces, but evaluation holds 5 whole rows of 1,024
    assert loss.piece_tokens(8 * 1024, PRESETS["tiny"].vocab_size) == 1024
    est = estimate_training(PRESETS["tiny"], LoraConfig(), TrainConfig(batch_size=8, seq_len=1024), "cpu")
    rows = loss.rows_that_fit(1024, V)
    assert rows == 5 and est.logits_bytes >= rows * 1024 * V * 4 * 2
    assert est.activation_bytes >= est.logits_bytes


def _spy_allocation(monkeypatch):
    """Record whether the trainer built an adapter, an optimizer or a batch."""
    touched = []
    monkeypatch.setattr(train, "add_adapter", lambda *a, **k: touched.append("adapter"))
    monkeypatch.setattr(train, "get_batch", lambda *a, **k: touched.append("batch"))
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: touched.append("optimizer"))
    return touched


def test_a_run_whose_estimate_exceeds_the_cap_is_refused_before_any_allocation(tiny, sample_ds, tmp_path,
                                                                                monkeypatch):
    touched = _spy_allocation(monkeypatch)
    with pytest.raises(MemoryLimitError,
                       match=r"needs about [\d.,]+ GB of memory \(estimate\), more than the 1\.0 GB allowed by "
                             r"--max-train-memory; lower the batch size \(now 4096\).*sequence length \(now 128\)"
                             r".*rank \(now 8\).*--checkpointing"):
        t = Trainer(tiny, sample_ds, LoraConfig(), quick(**GIANT), "big", tmp_path / "run",
                    max_memory=parse_size("1GB"))
        train_solo(t)
    assert touched == [] and adapter_names(tiny) == [] and not (tmp_path / "run").exists()


def test_without_a_cap_the_available_memory_is_the_limit(tiny, sample_ds, tmp_path, monkeypatch):
    from core.train.estimate import human_bytes
    from core.model.quant import weight_bytes
    monkeypatch.setattr(core_device, "available_memory", lambda dev: 300 * 2**20)
    room = human_bytes(300 * 2**20 + weight_bytes(tiny))  # the loaded base's weights are part of the run
    with pytest.raises(MemoryLimitError, match=f"more than the {room} of memory available now"):
        Trainer(tiny, sample_ds, LoraConfig(), quick(**GIANT), "big", tmp_path / "run")
    # the smaller of the two wins; a run that fits starts
    with pytest.raises(MemoryLimitError, match=f"{room} of memory available now"):
        Trainer(tiny, sample_ds, LoraConfig(), quick(**GIANT), "big", tmp_path / "run", max_memory=2**40)
    Trainer(tiny, sample_ds, LoraConfig(), quick(), "ok", tmp_path / "ok", max_memory=2**30)


def test_resume_with_the_same_settings_is_checked_too(tiny, sample_ds, tmp_path, monkeypatch):
    train_to_end(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=2), "r", tmp_path / "run"))
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    monkeypatch.setattr(core_device, "available_memory", lambda dev: 2**20)
    fresh = load_base("tiny", "cpu")
    with pytest.raises(MemoryLimitError, match="available now"):
        Trainer(fresh, sample_ds, None, quick(steps=4), "r", tmp_path / "run", resume=tmp_path / "run")
    assert adapter_names(fresh) == []
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_the_cli_refuses_a_run_too_large_for_the_machine(tmp_path, monkeypatch, capsys):
    from core.__main__ import main
    main(["prepare", "--input", str(data.SAMPLES_DIR / "brainrot.txt"), "--output", str(tmp_path / "ds")])
    monkeypatch.setattr(core_device, "available_memory", lambda dev: 256 * 2**20)
    rc = main(["finetune", "--data", str(tmp_path / "ds"), "--model", "tiny", "--batch-size", "4096",
               "--seq-len", "128", "--library", str(tmp_path / "lib"), "--output", "big"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: this run needs about") and "\n" not in err
    assert not (tmp_path / "lib" / "big").exists()


class _EvalSpy:
    """Wraps GPT.hidden: counts the forwards and tokens of evaluations (no grad, not a decode step) and may set
    a stop flag after some of them."""

    def __init__(self, model, stop: threading.Event | None = None, stop_after: int = 10**9):
        self.calls, self.tokens, self.real = 0, 0, model.hidden
        self.stop, self.stop_after = stop, stop_after

    def __call__(self, idx, route=None, *a, **kw):
        if not torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self.calls += 1
            self.tokens += idx.numel()
            if self.stop is not None and self.calls >= self.stop_after:
                self.stop.set()
        return self.real(idx, route, *a, **kw)


def test_an_evaluation_reads_at_most_its_token_budget(tiny, monkeypatch):
    spy = _EvalSpy(tiny)
    monkeypatch.setattr(tiny, "hidden", spy)
    val = (np.arange(400_000) % 50_000).astype(np.uint16)
    ev = evaluate_models(tiny, [None], val, seq_len=32)  # 12,500 windows of 32 in the split
    assert EVAL_TOKENS - 32 < ev.tokens == spy.tokens <= EVAL_TOKENS  # an even sample; the last window may be short
    with pytest.raises(ValueError, match="from 1 to 32,768"):
        evaluate_models(tiny, [None], val, seq_len=32, max_tokens=EVAL_TOKENS + 1)


def test_a_runs_validation_reads_eval_max_batches_of_its_batch(tiny, sample_ds, tmp_path):
    trainer = Trainer(tiny, sample_ds, LoraConfig(), quick(steps=1, batch_size=2, seq_len=32, eval_max_batches=1),
                      "s", tmp_path / "run")
    evals = [e for e in train_solo(trainer) if e["type"] == "eval"]
    assert evals and all(32 < e["val_tokens"] <= 2 * 32 for e in evals)  # 2 windows of 32 (the last may be short)


def test_stop_is_checked_inside_evaluation(tiny, monkeypatch):
    stop = threading.Event()
    spy = _EvalSpy(tiny, stop, stop_after=2)
    monkeypatch.setattr(tiny, "hidden", spy)
    val = (np.arange(100_000) % 50_000).astype(np.uint16)
    with pytest.raises(Stopped):
        evaluate_models(tiny, [None], val, seq_len=32, stop=stop, work=1)  # a chunk per window
    assert spy.calls == 2  # no chunk ran after the flag


def test_stop_during_the_first_evaluation_ends_the_run_at_once(tiny, sample_ds, tmp_path, monkeypatch):
    trainer = Trainer(tiny, sample_ds, LoraConfig(), quick(steps=50, eval_max_batches=50, batch_size=1,
                                                           sample_prompts=("Hi",)), "s", tmp_path / "run")
    spy = _EvalSpy(tiny, trainer.stop, stop_after=1)
    monkeypatch.setattr(tiny, "hidden", spy)
    events = train_solo(trainer)
    kinds = [e["type"] for e in events]
    assert "eval" not in kinds and "sample" not in kinds and "step" not in kinds
    assert events[-1]["type"] == "done" and events[-1]["status"] == "stopped" and events[-1]["step"] == 0
    assert spy.calls == 1


def test_stop_during_a_later_evaluation_skips_its_samples_and_ends_the_run(tiny, sample_ds, tmp_path,
                                                                          monkeypatch):
    trainer = Trainer(tiny, sample_ds, LoraConfig(), quick(steps=50, eval_interval=2, sample_prompts=("Hi",)),
                      "s", tmp_path / "run")
    spy = _EvalSpy(tiny)
    monkeypatch.setattr(tiny, "hidden", spy)

    def on_event(ev):
        if ev["type"] == "step" and ev["step"] == 2:
            spy.stop, spy.stop_after = trainer.stop, spy.calls + 1
    events = train_solo(trainer, on_event)
    assert [e["step"] for e in events if e["type"] == "sample"] == [0]
    assert events[-1]["status"] == "stopped" and events[-1]["step"] == 2


# ---- item 9: the base stays pinned from load until the job is registered (and while it runs) ----

def test_a_starting_training_run_pins_the_base_against_other_loads(tmp_path, hf_small, monkeypatch):
    from core import engine as core_engine
    eng = Engine("cpu", tmp_path / "lib")
    loading, release = threading.Event(), threading.Event()
    real_load = core_engine.load_base

    def slow_load(source, *a, **k):
        if source == "tiny":
            loading.set()
            release.wait(30)
        return real_load(source, *a, **k)

    monkeypatch.setattr(core_engine, "load_base", slow_load)
    got, refused = {}, []
    trainer_thread = threading.Thread(target=lambda: got.setdefault("model", eng.base("tiny", pin=True)))
    trainer_thread.start()
    assert loading.wait(30)

    def compare_other_base():
        try:
            eng.base(str(hf_small))
        except BaseInUse as e:
            refused.append(str(e))

    other = threading.Thread(target=compare_other_base)
    other.start()
    release.set()
    trainer_thread.join(30)
    other.join(30)
    assert refused and "in use by a starting or running training job" in refused[0]
    assert eng.model is got["model"] and eng.base_id == "tiny"
    assert eng.base("tiny") is got["model"]  # the same base is shared, not loaded twice

    eng.unpin_base(got["model"])
    assert eng.base(str(hf_small)) is not got["model"]


def test_the_runner_holds_the_pin_until_the_job_ends_and_releases_it_on_refusal(tmp_path, sample_ds, hf_small):
    from core.api import Runs
    eng = Engine("cpu", tmp_path / "lib", max_train_memory=parse_size("256MB"))
    runner = Runs(eng, lambda base_id: eng.base(base_id, pin=True))
    job = runner.start("tiny", sample_ds, "big", LoraConfig(), quick(**GIANT))
    assert job.wait(60) and job.state == "failed"
    assert "more than the 256.0 MB allowed by --max-train-memory" in job.message
    assert runner.busy() is None and not (eng.library.root / "big").exists()  # the name stays free
    model = eng.model
    assert eng.base(str(hf_small)) is not model  # the refused job released the pin

    job = runner.start("tiny", sample_ds, "ok", LoraConfig(), quick(steps=40, eval_interval=0))
    for _ in range(600):
        if job.snapshot()["points"]:
            break
        time.sleep(0.05)
    model = eng.model
    with pytest.raises(BaseInUse, match=r"the base model tiny is in use by a starting or running training job"):
        eng.base(str(hf_small))
    runner.wait(120)
    assert job.state == "finished"
    assert eng.base(str(hf_small)) is not model


# ---- the same rules through the studio's Train tab ------------------------------------------------

def test_the_train_tab_refuses_a_run_too_large_before_loading_the_base(tmp_path):
    from studio_helpers import _prepare, _start
    from studio.app import create_studio
    studio = create_studio(tmp_path / "lib", tmp_path / "datasets", "cpu", "tiny", max_train_memory="64MB")
    _prepare(studio)
    with pytest.raises(MemoryLimitError, match=r"more than the 64\.0 MB allowed by --max-train-memory; lower the "
                                               r"batch size \(now 4096\)"):
        _start(studio, "big", 5, batch=4096, seq_len=128)
    assert studio.engine.model is None  # refused before the base was loaded
    assert studio.runs.snapshot() is None and not (studio.library.root / "big").exists()


def test_the_train_tab_pins_its_base_until_the_run_ends(tmp_path, hf_small):
    from studio_helpers import _prepare, _start
    from studio.app import create_studio
    studio = create_studio(tmp_path / "lib", tmp_path / "datasets", "cpu", "tiny")
    _prepare(studio)
    _start(studio, "long", 500)
    for _ in range(600):  # the job pins its base when it starts (it is queued first)
        if studio.runs.snapshot()["state"] == "running":
            break
        time.sleep(0.05)
    model = studio.engine.model
    with pytest.raises(BaseInUse, match="in use by a starting or running training job"):
        studio.engine.base(str(hf_small))  # what a Compare queued during the load would have done
    assert studio.engine.model is model
    studio.runs.stop()
    assert studio.runs.wait(120)["state"] == "stopped"
    assert studio.engine.base(str(hf_small)) is not model  # released with the job


def test_the_app_takes_a_training_memory_cap(tmp_path, capsys):
    import app
    args = app.build_parser().parse_args(["--max-train-memory", "8GB"])
    assert args.max_train_memory == "8GB"
    assert app.main(["--max-train-memory", "lots", "--library", str(tmp_path / "l"),
                     "--datasets", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.strip() == "error: 'lots' is not a memory size; write it like 8GB, 512MB or 1.5GiB."
    from studio.app import create_studio
    studio = create_studio(tmp_path / "lib", tmp_path / "datasets", "cpu", "tiny", max_train_memory="8GB")
    assert studio.engine.max_train_memory == 8 * 2**30


@pytest.mark.parametrize("state", [{"step": 2}, {"step": "two", "optimizer": {}, "np_rng": "{}", "history": []},
                                   [1, 2, 3]], ids=["missing-keys", "wrong-types", "not-a-dict"])
def test_a_damaged_trainer_state_is_refused_with_a_message(tiny, sample_ds, tmp_path, state):
    import io
    train_to_end(Trainer(tiny, sample_ds, LoraConfig(), quick(steps=2), "r", tmp_path / "run"))
    ck = find_checkpoint(tmp_path / "run")
    buf = io.BytesIO()
    torch.save(state, buf)
    (ck.path / train.STATE).write_bytes(buf.getvalue())
    fresh = load_base("tiny", "cpu")
    with pytest.raises(ValueError, match=r"checkpoint .*step_000002 could not be read \(.*\); resume from another one"):
        train_solo(Trainer(fresh, sample_ds, None, quick(steps=4), "r", tmp_path / "run", resume=tmp_path / "run"))


def test_the_cli_takes_a_training_memory_cap(tmp_path, capsys):
    from core.__main__ import main
    main(["prepare", "--input", str(data.SAMPLES_DIR / "brainrot.txt"), "--output", str(tmp_path / "ds")])
    run = ["finetune", "--data", str(tmp_path / "ds"), "--model", "tiny", "--library", str(tmp_path / "lib"),
           "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--grad-accum", "1"]
    assert main([*run, "--output", "capped", "--max-train-memory", "1MB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: this run needs about") and "1.0 MB" in err and "\n" not in err
    assert main([*run, "--output", "bad", "--max-train-memory", "lots"]) == 2
    assert "'lots' is not a memory size" in capsys.readouterr().err
    assert not (tmp_path / "lib" / "capped").exists() and not (tmp_path / "lib" / "bad").exists()
    assert main([*run, "--output", "roomy", "--max-train-memory", "4GB"]) == 0
