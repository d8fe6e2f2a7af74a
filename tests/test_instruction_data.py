"""Instruction data: imports of .jsonl/.json/.csv/.tsv, the template, the loss mask, and training on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapter_helpers import randomize_b
from train_helpers import loss_alone, quick, train_solo
from core.__main__ import main
from core.lora.layers import add_adapter
from core.model import tokenizer
from core.lora.config import LoraConfig
from core.model.config import EOT_TOKEN
from core.train import data, imports, instruct
from core.train.evaluate import evaluate_models
from core.train.imports import Fields
from core.train.trainer import Trainer

QA = Fields(prompt="q", response="a")


def pairs(n: int = 40) -> list[dict]:
    """Questions with a learnable answer pattern (the answer repeats a word of the question)."""
    words = ["apple", "river", "stone", "cloud", "tiger", "music", "paper", "light"]
    return [{"q": f"Say the word {words[i % 8]} twice.", "a": f"{words[i % 8]} {words[i % 8]}"} for i in range(n)]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")


# ---- imports --------------------------------------------------------------------------

def test_jsonl_import_reads_the_chosen_fields_and_previews_the_first_records(tmp_path):
    f = tmp_path / "qa.jsonl"
    write_jsonl(f, [{"q": "hi", "a": "hello", "id": 1}, {"q": "bye", "a": "see you", "id": 2}] * 5)
    records = imports.read_file(f)
    assert len(records) == 10 and records[3].line == 4
    assert imports.pick(records, QA, f.name)[1] == {"prompt": "bye", "response": "see you"}
    names, rows = imports.preview(f.read_bytes(), f.name, rows=3)
    assert names == ["q", "a", "id"] and rows == [["hi", "hello", "1"], ["bye", "see you", "2"], ["hi", "hello", "1"]]


def test_csv_and_tsv_imports_pick_columns_with_quoted_commas_and_newlines(tmp_path):
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text('question,answer\n"a, b?","line one\nline two"\nplain,yes\n', "utf-8")
    got = imports.pick(imports.read_file(csv_file), Fields(prompt="question", response="answer"), "qa.csv")
    assert got == [{"prompt": "a, b?", "response": "line one\nline two"}, {"prompt": "plain", "response": "yes"}]
    tsv_file = tmp_path / "qa.tsv"
    tsv_file.write_text("q\ta\nx, y\tz\n", "utf-8")
    assert imports.pick(imports.read_file(tsv_file), QA, "qa.tsv") == [{"prompt": "x, y", "response": "z"}]


def test_a_text_field_makes_a_plain_text_dataset_of_the_records(tmp_path):
    f = tmp_path / "notes.jsonl"
    write_jsonl(f, [{"t": "first note " * 20}, {"t": "second note " * 20}])
    ds = instruct.prepare_records(f, Fields(text="t"))
    expected = tokenizer.encode(data.join_documents(["first note " * 20, "second note " * 20]))
    assert np.concatenate([ds.train, ds.val]).tolist() == expected
    assert ds.train_mask is None and ds.val_mask is None


BROKEN = [  # (file name, content, the error it must give)
    ("bad.jsonl", '{"q": "a", "a": "b"}\n{"q": "c", "a": "d"}\n{"q": "e", "a": oops}\n', r"bad JSON on line 3"),
    ("missing.jsonl", '{"q": "a", "a": "b"}\n\n{"q": "c", "answer": "d"}\n', r"line 3 has no field 'a'"),
    ("empty.jsonl", '{"q": "a", "a": "b"}\n{"q": "c", "a": "   "}\n', r"empty response on line 2"),
    ("ragged.csv", 'q,a\nx,y\n"multi\nline",z\nonly-one-column\n', r"row on line 5 has 1 columns, the header has 2"),
    ("missing.csv", 'q,answer\nx,y\n', r"line 2 has no field 'a'"),
    ("empty.csv", 'q,a\nx,y\nw,\n', r"empty response on line 3"),
    ("bad.json", '[{"q": "a", "a": "b"},\n {"q": "c" "a": "d"}]', r"bad JSON on line 2"),
    ("list.jsonl", '{"q": "a", "a": "b"}\n["q", "a"]\n', r"line 2 is a JSON list, not an object"),
    ("nested.jsonl", '{"q": "a", "a": {"x": 1}}\n', r"line 1: field 'a' is a dict, not text"),
    ("latin1.csv", "q,a\ncaf\u00e9,x\n".encode("latin-1"), r"not UTF-8"),
]


@pytest.mark.parametrize("name,content,error", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_file_is_refused_with_its_line_and_no_dataset_is_written(tmp_path, name, content, error):
    f = tmp_path / name
    f.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=error):
        instruct.prepare_records(f, QA, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_cli_refuses_a_broken_file_in_one_line_and_writes_nothing(tmp_path, capsys):
    from cli_helpers import one_line_error
    f = tmp_path / "bad.jsonl"
    f.write_text('{"q": "a", "a": "b"}\n{"q": "c", "a": "d"\n', "utf-8")
    err = one_line_error(capsys, ["prepare", "--input", f, "--prompt-field", "q", "--response-field", "a",
                                  "--output", tmp_path / "out"])
    assert "bad JSON on line 2" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template,error", [
    ("### Q: {prompt}", r"\{response\} exactly once"),
    ("{response} then {prompt}", r"\{prompt\} must come before \{response\}"),
    ("{prompt} {prompt} {response}", r"\{prompt\} exactly once"),
    ("", r"template is empty"),
])
def test_a_template_without_its_two_slots_in_order_is_refused(template, error):
    with pytest.raises(ValueError, match=error):
        instruct.build_instruction_dataset([{"prompt": "a", "response": "b"}] * 2, ["x"], template)


# ---- the template and the mask --------------------------------------------------------

def test_the_mask_covers_the_response_and_end_of_text_and_leaves_out_the_prompt():
    template = "Q: {prompt}\nA: {response}"
    ids, mask = instruct.encode_example(template, "What {is} 2+2?", "four")
    prompt_ids = [t for t, m in zip(ids, mask) if m == 0]
    response_ids = [t for t, m in zip(ids, mask) if m == 1]
    assert tokenizer.decode(prompt_ids) == "Q: What {is} 2+2?\nA: "  # braces in a prompt are text
    assert response_ids[-1] == EOT_TOKEN and tokenizer.decode(response_ids[:-1]) == "four"
    assert mask == sorted(mask)  # prompt tokens first, then the response's
    assert instruct.render_prompt(template, "hi") == "Q: hi\nA: "


def test_an_instruction_dataset_splits_by_examples_and_saves_its_masks_beside_the_tokens(tmp_path):
    f = tmp_path / "qa.jsonl"
    write_jsonl(f, pairs(10))
    ds = instruct.prepare_records(f, QA, tmp_path / "ds", train_ratio=0.8)
    files = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert files == ["meta.json", "train_00000.npy", "train_mask_00000.npy", "val_00000.npy", "val_mask_00000.npy"]
    loaded = data.load_dataset(tmp_path / "ds")
    assert np.array_equal(loaded.train_mask, ds.train_mask) and loaded.train_mask.dtype == np.uint8
    assert np.array_equal(loaded.val, ds.val) and len(loaded.val_mask) == len(loaded.val)
    m = loaded.meta
    assert (m["kind"], m["records"], m["train_records"], m["val_records"]) == ("instruction", 10, 8, 2)
    assert m["template"] == instruct.DEFAULT_TEMPLATE and "train_mask_00000.npy" in m["loss_mask"]
    assert m["response_tokens"] == int(ds.train_mask.sum() + ds.val_mask.sum())
    # each split is whole examples: it ends with an end-of-text, and the validation split starts a prompt
    assert ds.train[-1] == EOT_TOKEN and ds.val[-1] == EOT_TOKEN and ds.val_mask[0] == 0


def test_a_mask_that_does_not_match_its_tokens_is_refused_on_load(tmp_path):
    f = tmp_path / "qa.jsonl"
    write_jsonl(f, pairs(4))
    instruct.prepare_records(f, QA, tmp_path / "ds")
    np.save(tmp_path / "ds" / "val_mask_00000.npy", np.ones(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="val loss mask does not match its tokens"):
        data.load_dataset(tmp_path / "ds")


def test_a_plain_text_dataset_keeps_the_seeds_layout(tmp_path):
    text = data.load_sample("brainrot")
    ds = data.prepare(text=text, output=tmp_path / "ds")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["meta.json", "train_00000.npy", "val_00000.npy"]
    ids = np.asarray(tokenizer.encode(text), dtype=np.uint16)
    n = int(len(ids) * 0.9)
    assert np.array_equal(np.load(tmp_path / "ds" / "train_00000.npy"), ids[:n])
    assert np.array_equal(np.load(tmp_path / "ds" / "val_00000.npy"), ids[n:])
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert not {"kind", "template", "loss_mask", "records"} & set(meta)
    loaded = data.load_dataset(tmp_path / "ds")
    assert loaded.train_mask is None and loaded.val_mask is None
    # batches of a plain dataset: every target counts (no ignored position)
    x, y = data.get_batch(loaded.train, 4, 32, np.random.default_rng(0))
    assert torch.equal(x[:, 1:], y[:, :-1]) and (y >= 0).all()


# ---- the loss ------------------------------------------------------------------------

@pytest.fixture
def adapted(tiny):
    add_adapter(tiny, "qa", LoraConfig(r=4))
    randomize_b(tiny, "qa", std=0.3, seed=5)
    return tiny


def hand_loss(model, x, y, keep, name) -> float:
    """Cross entropy by hand: log-softmax of the logits, the target's entry, mean over kept positions."""
    with torch.no_grad():
        logp = torch.log_softmax(model(x, route=name).float(), dim=-1)
    picked = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    return float(-(picked[keep]).double().sum() / keep.sum())


def test_the_masked_loss_is_the_hand_computed_loss_over_response_tokens_only(adapted):
    ds = instruct.build_instruction_dataset([{"prompt": p["q"], "response": p["a"]} for p in pairs(20)], ["x"])
    x, y = data.get_batch(ds.train, 4, 48, np.random.default_rng(1), mask=ds.train_mask)
    x_all, y_all = data.get_batch(ds.train, 4, 48, np.random.default_rng(1))
    assert torch.equal(x, x_all)  # the same windows: only the targets differ
    keep = y != data.IGNORE
    assert 0 < int(keep.sum()) < keep.numel()  # the windows hold prompt and response tokens
    assert torch.equal(y[keep], y_all[keep])
    with torch.no_grad():
        masked = float(adapted.loss(x, y, "qa", chunk=0))
        whole = float(adapted.loss(x_all, y_all, "qa", chunk=0))
    assert masked == pytest.approx(hand_loss(adapted, x, y_all, keep, "qa"), abs=1e-5)
    assert whole == pytest.approx(hand_loss(adapted, x, y_all, torch.ones_like(keep), "qa"), abs=1e-5)
    assert abs(masked - whole) > 1e-3  # the mask changed what is measured
    # the chunked training loss (with gradients) is the same mean
    chunked = adapted.loss(x, y, "qa", chunk=16)
    assert float(chunked.detach()) == pytest.approx(masked, abs=1e-5)


def test_a_window_of_prompt_tokens_only_has_zero_loss_and_no_nan_gradient(adapted):
    x = torch.tensor([tokenizer.encode("### Instruction:\nSay the word apple twice.")])
    y = torch.full_like(x, data.IGNORE)
    loss = adapted.loss(x, y, "qa", chunk=0)
    loss.backward()
    assert float(loss.detach()) == 0.0
    grads = [p.grad for n, p in adapted.named_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_validation_counts_response_tokens_only_by_hand_and_in_the_batched_evaluation(adapted):
    ds = instruct.build_instruction_dataset([{"prompt": p["q"], "response": p["a"]} for p in pairs(20)], ["x"],
                                            train_ratio=0.5)
    loss, n = loss_alone(adapted, "qa", ds.val, 32, mask=ds.val_mask)
    # by hand: consecutive windows, every response token predicted once
    total, count = 0.0, 0
    for w, m in zip(data.eval_windows(ds.val, 32), data.eval_windows(ds.val_mask, 32)):
        x, y = torch.tensor(w[None, :-1].astype(np.int64)), torch.tensor(w[None, 1:].astype(np.int64))
        keep = torch.tensor(m[None, 1:] > 0)
        if keep.any():
            total += hand_loss(adapted, x, y, keep, "qa") * int(keep.sum())
            count += int(keep.sum())
    assert n == count == int(ds.val_mask[1:].sum())
    assert loss == pytest.approx(total / count, abs=1e-5)
    plain, _ = loss_alone(adapted, "qa", ds.val, 32)
    assert abs(plain - loss) > 1e-3
    batched = evaluate_models(adapted, [None, "qa"], ds.val, 32, mask=ds.val_mask)
    assert batched.tokens == count
    assert batched.scores[1].loss == pytest.approx(loss, abs=1e-5)
    assert batched.scores[0].loss == pytest.approx(loss_alone(adapted, None, ds.val, 32, mask=ds.val_mask)[0], abs=1e-5)


# ---- training -------------------------------------------------------------------------

def test_an_instruction_dataset_trains_and_its_response_loss_falls(tiny, tmp_path):
    f = tmp_path / "qa.jsonl"
    write_jsonl(f, pairs(60))
    ds = instruct.prepare_records(f, QA, tmp_path / "ds")
    cfg = quick(steps=30, lr=3e-2, grad_accum=1, batch_size=4, seq_len=48, eval_interval=15, checkpoint_interval=30)
    events = train_solo(Trainer(tiny, data.load_dataset(tmp_path / "ds"), LoraConfig(), cfg, "qa", tmp_path / "run"))
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 15, 30]
    assert evals[-1]["val_tokens"] <= int(ds.val_mask[1:].sum())  # response tokens only
    assert evals[-1]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"]  # measured 10.80 -> 10.46
    assert all(np.isfinite(e["loss"]) for e in events if e["type"] == "step")


def test_co_batched_training_honours_each_runs_mask(tiny, tmp_path):
    from core.train.cobatch import forward_backward
    ds_qa = instruct.build_instruction_dataset([{"prompt": p["q"], "response": p["a"]} for p in pairs(20)], ["x"])
    ds_txt = data.prepare(text=data.load_sample("brainrot"))
    runs = [Trainer(tiny, ds, LoraConfig(), quick(seq_len=24 + 8 * i), f"r{i}", tmp_path / f"run{i}")
            for i, ds in enumerate([ds_qa, ds_txt])]
    for r in runs:
        r.setup()
    together = [float(x) for x in forward_backward(tiny, runs)]
    for r in runs:  # the same batches again, each alone: the same losses
        r._prepared.rng = np.random.default_rng(r.tcfg.seed)
    alone = [float(forward_backward(tiny, [r])[0]) for r in runs]
    assert together == pytest.approx(alone, abs=1e-5)
    x, y = data.get_batch(ds_qa.train, 2, 24, np.random.default_rng(runs[0].tcfg.seed), mask=ds_qa.train_mask)
    with torch.no_grad():
        assert alone[0] == pytest.approx(float(tiny.loss(x, y, "r0", chunk=0)), abs=1e-5)


# ---- the CLI --------------------------------------------------------------------------

def test_cli_prepare_with_prompt_and_response_fields_and_a_template_file(tmp_path, capsys):
    f = tmp_path / "qa.csv"
    f.write_text("question,answer\n" + "".join(f"{p['q']},{p['a']}\n" for p in pairs(10)), "utf-8")
    tpl = tmp_path / "tpl.txt"
    tpl.write_text("User: {prompt}\nBot: {response}\n", "utf-8")  # an editor's final newline
    rc = main(["prepare", "--input", str(f), "--prompt-field", "question", "--response-field", "answer",
               "--template", str(tpl), "--output", str(tmp_path / "ds")])
    out = capsys.readouterr().out
    assert rc == 0 and "10 examples" in out and "response tokens" in out
    ds = data.load_dataset(tmp_path / "ds")
    assert ds.meta["template"] == "User: {prompt}\nBot: {response}"
    first = ds.train[:int(np.argmax(ds.train == EOT_TOKEN)) + 1]
    assert tokenizer.decode(first.tolist()) == "User: Say the word apple twice.\nBot: apple apple<|endoftext|>"
    bad = tmp_path / "bad.txt"
    bad.write_text("no slots here", "utf-8")
    from cli_helpers import one_line_error
    err = one_line_error(capsys, ["prepare", "--input", f, "--prompt-field", "question", "--response-field",
                                  "answer", "--template", bad, "--output", tmp_path / "ds2"])
    assert "{prompt} exactly once" in err and not (tmp_path / "ds2").exists()


def test_cli_eval_scores_an_instruction_split_on_response_tokens_only(tmp_path, source, capsys):
    from adapter_helpers import LX
    from core.engine import Engine
    Engine("cpu", tmp_path / "lib").library.save(source, "x", "x", LX, "tiny")
    f = tmp_path / "qa.jsonl"
    write_jsonl(f, pairs(20))
    ds = instruct.prepare_records(f, QA, tmp_path / "ds", train_ratio=0.5)
    capsys.readouterr()
    assert main(["eval", "--data", str(tmp_path / "ds"), "--lora", "x", "--library", str(tmp_path / "lib"),
                 "--seq-len", "32", "--json", "--precision", "fp32"]) == 0  # as `source`, on any CPU
    out = json.loads(capsys.readouterr().out)
    x = next(m for m in out["models"] if m["model"] == "x")
    alone, n = loss_alone(source, "x", ds.val, 32, mask=ds.val_mask)
    assert x["tokens"] == n == int(ds.val_mask[1:].sum())
    assert x["loss"] == pytest.approx(alone, abs=1e-5)
