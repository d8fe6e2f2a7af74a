"""Evaluation in core (core.train.evaluate, Engine.evaluate) and `python -m core eval`: the base and several
adapters scored in one batched pass equal each model scored alone; token log-prob differences equal two
separate forwards."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapter_helpers import LX, LY, make_adapter
from cli_helpers import cli, one_line_error
from core.adapters.validate import AdapterError
from core.engine import Engine
from core.lora.layers import adapter_names
from core.lora.config import LoraConfig
from core.model.config import EOT_TOKEN
from core.model import tokenizer
from core.train.evaluate import MAX_MODELS, evaluate_models, text_ids, token_differences, windows_per_forward
from train_helpers import loss_alone

TEXT = "Ahoy! Today in the galley we cook <b>fish</b> & chips, no cap.\nArr."


@pytest.fixture
def tiny_abc(tiny_ab):
    """tiny_ab plus 'c' (rank 2 on attn.c_proj), so the base and three adapters share a batch."""
    make_adapter(tiny_ab, "c", LoraConfig(r=2, alpha=4.0, targets=("attn.c_proj",)), seed=3, std=0.3)
    return tiny_ab


def test_each_adapter_changes_the_loss(tiny_abc, sample_ds):
    ev = evaluate_models(tiny_abc, [None, "a", "b", "c"], sample_ds.train, seq_len=64)
    losses = [s.loss for s in ev.scores]
    assert all(abs(x - losses[0]) > 1e-4 for x in losses[1:]), losses
    assert len({round(x, 6) for x in losses}) == 4


@pytest.mark.parametrize("budget", [None, 2 * 64 * 50257 * 4])  # default; or two rows of logits at a time
def test_one_batched_pass_equals_each_model_alone(tiny_abc, sample_ds, budget):
    names = [None, "a", "b", "c"]
    kw = {} if budget is None else {"budget": budget}
    ev = evaluate_models(tiny_abc, names, sample_ds.train, seq_len=64, **kw)
    assert ev.windows == 16 and ev.tokens == len(sample_ds.train) - 1  # the split, its last window shorter
    if budget is not None:
        assert windows_per_forward(4, 64, 50257, budget) == 1 and ev.forwards == 16
    else:
        assert ev.forwards == 2  # 15 whole windows in one forward (60 rows), the short last one in another
    for name, score in zip(names, ev.scores):
        alone, n = loss_alone(tiny_abc, name, sample_ds.train, 64)
        assert score.name == name and score.tokens == n
        assert abs(score.loss - alone) < 1e-5, (name, score.loss, alone)
        assert score.ppl == pytest.approx(np.exp(score.loss))


def test_the_token_cap_samples_the_same_windows_as_the_trainer(tiny_ab, sample_ds):
    ev = evaluate_models(tiny_ab, ["a", None], sample_ds.train, seq_len=32, max_tokens=256)
    assert ev.windows == 8 and 7 * 32 < ev.tokens <= 256  # an even sample; it ends with the short last window
    for name, score in zip(["a", None], ev.scores):
        alone, n = loss_alone(tiny_ab, name, sample_ds.train, 32, windows=8)
        assert n == score.tokens and abs(score.loss - alone) < 1e-5


def test_token_differences_equal_two_separate_forwards(tiny_ab):
    diffs = token_differences(tiny_ab, TEXT, "a")
    ids = tokenizer.encode(TEXT)
    assert "".join(d.text for d in diffs) == TEXT and len(diffs) == len(ids)
    assert max(abs(d.diff) for d in diffs) > 1e-3  # the adapter changes the log-probs at all
    x = torch.tensor([[EOT_TOKEN] + ids])
    with torch.no_grad():
        base = F.log_softmax(tiny_ab(x[:, :-1], None).float(), -1)[0].gather(1, x[0, 1:, None])[:, 0]
        tuned = F.log_softmax(tiny_ab(x[:, :-1], "a").float(), -1)[0].gather(1, x[0, 1:, None])[:, 0]
    for d, b, a in zip(diffs, base.tolist(), tuned.tolist()):
        assert abs(d.logp_base - b) < 1e-5 and abs(d.logp_adapter - a) < 1e-5
        assert abs(d.diff - (a - b)) < 1e-5
    text, logp_base, logp_adapter, diff = diffs[0]  # a plain tuple too
    assert diff == logp_adapter - logp_base


@pytest.mark.parametrize("names, kw, pattern", [
    ([], {}, "at least one model"),
    ([None] + ["a"] * 2, {}, "once"),
    ([None] * 10, {}, f"at most {MAX_MODELS}"),
    ([None], {"seq_len": 0}, "sequence length"),
    ([None], {"seq_len": 4096}, "sequence length"),
    ([None], {"max_tokens": 10**6}, "tokens to evaluate"),
])
def test_bad_evaluations_are_refused(tiny_ab, sample_ds, names, kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        evaluate_models(tiny_ab, names, sample_ds.train, **kw)


def test_bad_texts_are_refused(tiny_ab):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_models(tiny_ab, [None], np.array([1], dtype=np.uint16))
    with pytest.raises(ValueError, match="no text"):
        text_ids("")
    with pytest.raises(ValueError, match="no text"):
        token_differences(tiny_ab, "", "a")
    with pytest.raises(ValueError, match="at most 1,023"):
        token_differences(tiny_ab, " x" * 1100, "a")
    with pytest.raises(KeyError):
        token_differences(tiny_ab, "hello", "nope")




def test_engine_evaluate_loads_library_adapters_on_the_shared_base(engine_xy, source, sample_ds):
    ev = engine_xy.evaluate(sample_ds.train, [None, "x", "y"], seq_len=64)
    assert [s.name for s in ev.scores] == [None, "x", "y"]
    for name, score in zip([None, "x", "y"], ev.scores):  # the adapters' source model, one at a time
        alone, _ = loss_alone(source, name, sample_ds.train, 64)
        assert abs(score.loss - alone) < 1e-5
    assert engine_xy._refs == {}  # nothing stays pinned
    diffs = engine_xy.token_differences(TEXT, "x")
    assert [tuple(d) for d in diffs] == [tuple(d) for d in token_differences(source, TEXT, "x")]


def test_engine_evaluate_refuses_unknown_adapters_and_loads_nothing(engine_xy, sample_ds):
    before = sorted(adapter_names(engine_xy.model))
    with pytest.raises(AdapterError, match="no adapter named 'nope'"):
        engine_xy.evaluate(sample_ds.train, [None, "nope"])
    with pytest.raises(ValueError, match="at most"):
        engine_xy.evaluate(sample_ds.train, [None] + [f"n{i}" for i in range(9)])
    with pytest.raises(AdapterError, match="choose an adapter"):
        engine_xy.token_differences(TEXT, None)
    assert sorted(adapter_names(engine_xy.model)) == before and engine_xy._refs == {}


# ---- the CLI -------------------------------------------------------------------------------

@pytest.fixture
def cli_lib(tmp_path, source, prepared):
    lib = Engine("cpu", tmp_path / "lib").library
    lib.save(source, "x", "x", LX, "tiny")
    lib.save(source, "y", "y", LY, "tiny")
    return tmp_path / "lib", prepared


def test_cli_eval_prints_a_table_and_json(tmp_path, cli_lib, source):
    lib, ds = cli_lib
    r = cli("eval", "--data", ds, "--lora", "x", "y", "--library", lib, "--split", "train", "--seq-len", "64",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["model", "loss", "ppl", "tokens", "seconds"])
    table = {line.split()[0]: line.split()[1:] for line in lines[header + 1:header + 4]}
    assert list(table) == ["base", "x", "y"]
    assert "3 model(s) in one batched pass" in r.stdout
    from core.train.data import load_dataset
    train = load_dataset(ds).train
    for name in ("x", "y"):
        alone, n = loss_alone(source, name, train, 64)
        assert float(table[name][0]) == pytest.approx(alone, abs=1e-4)
        assert table[name][2] == f"{n:,}"

    r = cli("eval", "--data", ds, "--lora", "x", "y", "--library", lib, "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)  # stdout holds the JSON object alone; the loading lines went to stderr
    assert "loading base model" in r.stderr
    assert out["split"] == "val" and out["base_model"] == "tiny" and out["seq_len"] == 128
    assert [m["model"] for m in out["models"]] == ["base", "x", "y"]
    assert [m["adapter"] for m in out["models"]] == [None, "x", "y"]
    assert all(m["tokens"] == out["tokens"] > 0 and m["loss"] > 0 for m in out["models"])


def test_cli_eval_bad_input_is_one_line(capsys, cli_lib):
    lib, ds = cli_lib
    err = one_line_error(capsys, ["eval", "--data", ds, "--lora", "nope", "--library", lib])
    assert "no adapter named 'nope'" in err
    err = one_line_error(capsys, ["eval", "--data", ds, "--lora", *[f"a{i}" for i in range(9)], "--library", lib])
    assert "at most 8 adapters" in err
    assert "invalid choice" in one_line_error(capsys, ["eval", "--data", ds, "--split", "test"])
    assert "no such dataset" in one_line_error(capsys, ["eval", "--data", ds.parent / "missing", "--model", "tiny"])
    err = one_line_error(capsys, ["eval", "--data", ds, "--model", "tiny", "--library", lib, "--seq-len", "0"])
    assert "sequence length" in err
