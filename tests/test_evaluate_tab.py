"""The studio's Evaluate tab, through its handlers on the tiny model: a table and a figure per evaluation,
coloured token differences, and refused input (one-line messages, no state change)."""
from __future__ import annotations

import html
import re

import numpy as np
import pytest

from adapter_helpers import LX, LY
from core.adapters.validate import AdapterError
from core.train.evaluate import token_differences
from train_helpers import loss_alone
from studio.tabs import evaluate as ev_tab
from studio.tabs.evaluate import DiffForm, EvalForm
from studio_helpers import _prepare, refused

TEXT = "Ahoy <script>alert(1)</script> & 'quotes'\nArr."


@pytest.fixture
def studio_xy(studio, source):
    studio.engine.library.save(source, "x", "x", LX, "tiny")
    studio.engine.library.save(source, "y", "y", LY, "tiny")
    _prepare(studio)  # dataset 'pirates'
    studio.base("tiny")
    return studio


def _form(**kw) -> EvalForm:
    return EvalForm(**{"model": "tiny", "adapters": ["x", "y"], "dataset": "pirates", "seq_len": 64, **kw})


def test_evaluate_gives_a_table_a_figure_and_a_summary(studio_xy, source):
    table, fig, summary = ev_tab.evaluate(studio_xy, _form(split="train"))
    assert [row[0] for row in table] == ["base", "x", "y"]
    train = studio_xy.dataset_store.load("pirates").train
    for row, name in zip(table, [None, "x", "y"]):
        alone, n = loss_alone(source, name, train, 64, windows=64)  # 4,096 tokens: 64 windows of 64
        assert row[1] == pytest.approx(alone, abs=1e-4) and row[2] == pytest.approx(np.exp(alone), rel=1e-3)
        assert row[3] == n
    assert table[0][1] != table[1][1] != table[2][1]  # the adapters change the loss
    assert [t.name for t in fig.data] == ["loss", "perplexity"] and list(fig.data[0].x) == ["base", "x", "y"]
    assert "3 model(s) in one batched pass" in summary and "train split of pirates" in summary


def test_evaluate_on_pasted_text_without_the_base(studio_xy):
    table, fig, summary = ev_tab.evaluate(studio_xy, _form(source="Pasted text", text=TEXT, include_base=False))
    assert [row[0] for row in table] == ["x", "y"] and "the pasted text" in summary
    assert table[0][3] == len(ev_tab.text_ids(TEXT)) - 1  # every token after <|endoftext|> predicted once


@pytest.mark.parametrize("form, exc, pattern", [
    (dict(adapters=["x", "nope"]), AdapterError, "no adapter named 'nope'"),
    (dict(adapters=["x", "x"]), ValueError, "once"),
    (dict(adapters=[f"a{i}" for i in range(9)]), ValueError, "at most 8"),
    (dict(adapters="x"), ValueError, "must be a list"),
    (dict(adapters=[], include_base=False), ValueError, "at least one adapter"),
    (dict(model="gpt9"), ValueError, "unknown base model"),
    (dict(dataset="missing"), ValueError, "no dataset named 'missing'"),
    (dict(dataset="../x"), ValueError, "invalid dataset name"),
    (dict(dataset=""), ValueError, "choose a dataset"),
    (dict(split="test"), ValueError, "val or train"),
    (dict(source="Pasted text", text="   "), ValueError, "paste some text"),
    (dict(source="Pasted text", text="a\ud800b"), ValueError, "lone surrogate"),
    (dict(source="Pasted text", text="x" * (ev_tab.MAX_EVAL_TEXT_CHARS + 1)), ValueError, "the limit is"),
    (dict(source="elsewhere"), ValueError, "source must be"),
    (dict(max_tokens=10**6), ValueError, "from 1 to 32,768"),
    (dict(seq_len=None), ValueError, "sequence length is empty"),
    (dict(seq_len=5000), ValueError, "sequence length must be"),
])
def test_bad_evaluations_are_refused_and_change_nothing(studio_xy, form, exc, pattern):
    msg = refused(studio_xy, exc, pattern, ev_tab.evaluate, studio_xy, _form(**form))
    assert "\n" not in msg


def test_token_differences_are_coloured_escaped_and_on_hover(studio_xy, source):
    out = ev_tab.differences(studio_xy, DiffForm(model="tiny", adapter="x", text=TEXT))
    diffs = token_differences(source, TEXT, "x")
    spans = re.findall(r"<span class='dtok' style='background:rgba\((\d+), [^']*' title='([^']*)'>([^<]*)</span>", out)
    assert len(spans) == len(diffs)
    assert "<script" not in out and "&lt;" in out and "&amp;" in out  # tokens '<', 'script', '>' all escaped
    assert "".join(html.unescape(text) for _, _, text in spans).replace("↵\n", "\n") == TEXT
    for (green, title, _), d in zip(spans, diffs):
        assert (green == "16") == (d.diff >= 0)  # green likelier, red less likely
        assert f"difference {d.diff:+.3f}" in title and f"base {d.logp_base:.3f}" in title
    assert any(d.diff > 0 for d in diffs) and any(d.diff < 0 for d in diffs)


@pytest.mark.parametrize("form, exc, pattern", [
    (dict(adapter="nope"), AdapterError, "no adapter named 'nope'"),
    (dict(adapter=None), ValueError, "choose an adapter"),
    (dict(text=""), ValueError, "write or paste a text"),
    (dict(text="x" * 4001), ValueError, "the limit is 4,000"),
    (dict(text="\udfff"), ValueError, "lone surrogate"),
])
def test_bad_token_difference_input_is_refused(studio_xy, form, exc, pattern):
    refused(studio_xy, exc, pattern, ev_tab.differences, studio_xy, DiffForm(**{"model": "tiny", "adapter": "x",
                                                                                "text": TEXT, **form}))


def test_compare_text_feeds_the_differences_form():
    assert ev_tab.from_compare(True, ["x", "y"], "base text", "x text", "y text", "", "") == ("x text", "x")
    assert ev_tab.from_compare(False, ["y"], "y text", "", "", "", "") == ("y text", "y")
    with pytest.warns(UserWarning):
        ev_tab.from_compare(True, [], "base text", "", "", "", "")


def test_the_tab_is_in_the_studio(studio_xy):
    from studio.app import build_ui
    demo = build_ui(studio_xy)
    parts = demo.parts["evaluate"]
    assert {"table", "plot", "diff_view", "from_compare"} <= set(parts)
    names = [b.get("api_name") for b in demo.config["dependencies"]]
    assert "evaluate" in names and "token_differences" in names
