"""The studio's handlers for instruction data, called directly on the tiny model: a records upload ->
field pickers and a preview -> the masked token view -> a dataset -> training -> Compare with the template."""
from __future__ import annotations

import json

import pytest

from core.generate.sampling import SamplingConfig, generate_text
from core.train.instruct import DEFAULT_TEMPLATE, render_prompt
from studio.tabs import compare
from studio.tabs import data_records as rec
from studio.tabs.compare import CompareForm
from studio_helpers import _train, refused

ROWS = [{"instruction": f"Name a colour number {i}.", "output": ["red", "green", "blue"][i % 3], "id": i}
        for i in range(30)]


def upload(tmp_path, name="colours.jsonl", rows=ROWS) -> str:
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return str(f)


def test_an_upload_fills_the_pickers_and_the_preview(tmp_path):
    path, table, prompt, response, text, name = rec.inspect_upload(upload(tmp_path))
    assert (prompt["value"], response["value"], text["value"]) == ("instruction", "output", "")
    assert prompt["choices"] == ["", "instruction", "output", "id"]
    assert table["value"]["headers"] == ["instruction", "output", "id"]
    assert table["value"]["data"][:2] == [["Name a colour number 0.", "red", "0"], ["Name a colour number 1.", "green", "1"]]
    assert name == "colours" and path.endswith("colours.jsonl")


def test_a_csv_upload_offers_its_columns(tmp_path):
    f = tmp_path / "qa.csv"
    f.write_text("question,answer\nWhy?,Because.\nHow?,Like this.\n", "utf-8")
    _, table, prompt, response, _, _ = rec.inspect_upload(str(f))
    assert (prompt["value"], response["value"]) == ("question", "answer")
    assert table["value"]["data"] == [["Why?", "Because."], ["How?", "Like this."]]


def test_token_view_marks_prompt_tokens_as_masked(tmp_path):
    html = rec.masked_view(upload(tmp_path), "instruction", "output", "", "Q: {prompt}\nA: {response}")
    assert "tok-masked" in html and "prompt: no loss" in html
    masked = html.count("class='tok tok-masked'")
    coloured = html.count("class='tok tok-c")
    assert masked > coloured > 0  # prompts are longer than the one-word answers
    # with a text field there is no mask: nothing is greyed out
    plain = rec.masked_view(upload(tmp_path), "", "", "instruction", DEFAULT_TEMPLATE)
    assert "tok-masked" not in plain


def test_records_prepare_a_dataset_and_refuse_bad_input_without_writing(studio, tmp_path):
    path = upload(tmp_path)
    msg = rec.prepare_records(studio, path, "instruction", "output", "", DEFAULT_TEMPLATE, 0.9, "colours")
    assert "30 examples" in msg and "response tokens" in msg
    assert studio.dataset_store.load("colours").train_mask is not None
    refused(studio, ValueError, r"\{response\} exactly once", rec.prepare_records, studio, path, "instruction",
            "output", "", "Q: {prompt}", 0.9, "other")
    broken = upload(tmp_path, "broken.jsonl", ROWS[:3] + [{"instruction": "x", "output": ""}])
    refused(studio, ValueError, r"empty response on line 4", rec.prepare_records, studio, broken, "instruction",
            "output", "", DEFAULT_TEMPLATE, 0.9, "other")
    refused(studio, ValueError, r"line 1 has no field 'answer'", rec.prepare_records, studio, path, "instruction",
            "answer", "", DEFAULT_TEMPLATE, 0.9, "other")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops}\n', "utf-8")
    refused(studio, ValueError, r"bad JSON on line 2", rec.inspect_upload, str(bad))


def test_compare_applies_the_dataset_template_to_the_prompt(studio, tmp_path):
    template = "User: {prompt}\nBot: {response}"
    rec.prepare_records(studio, upload(tmp_path), "instruction", "output", "", template, 0.9, "colours")
    _train(studio, "colourbot", 4, dataset="colours")
    cfg = SamplingConfig(max_new_tokens=6, temperature=0, seed=1)
    form = dict(model="tiny", adapters=["colourbot"], prompt="Name a colour.", temperature=0, max_tokens=6, seed=1)
    final = list(compare.compare(studio, CompareForm(**form, apply_template=True)))[-1]
    wrapped = render_prompt(template, "Name a colour.")
    assert wrapped == "User: Name a colour.\nBot: "
    expected = generate_text(studio.engine.model, wrapped, [None, studio.engine.load("colourbot")], cfg)
    assert final[:2] == [wrapped + t for t in expected]
    plain = list(compare.compare(studio, CompareForm(**form)))[-1]
    assert plain[0].startswith("Name a colour.") and not plain[0].startswith("User:")


def test_the_evaluate_tab_scores_an_instruction_split_on_response_tokens_only(studio, tmp_path):
    from core.train.evaluate import evaluate_models
    from studio.tabs import evaluate as ev_tab
    from studio.tabs.evaluate import EvalForm
    rec.prepare_records(studio, upload(tmp_path), "instruction", "output", "", DEFAULT_TEMPLATE, 0.8, "colours")
    ds = studio.dataset_store.load("colours")
    table, _, summary = ev_tab.evaluate(studio, EvalForm(model="tiny", adapters=[], dataset="colours", seq_len=32))
    assert "response tokens only" in summary
    assert table[0][3] == int(ds.val_mask[1:].sum())  # each response token of the split predicted once
    masked = evaluate_models(studio.engine.model, [None], ds.val, 32, mask=ds.val_mask).scores[0].loss
    whole = evaluate_models(studio.engine.model, [None], ds.val, 32).scores[0].loss
    assert table[0][1] == pytest.approx(masked, abs=1e-4) and abs(masked - whole) > 1e-3
