"""Issue 29, point 7: the errors a first-time user meets say what to do next, in one sentence.

Prepare with no text asks for text before it looks at the name; Steps = 0 through the served API gets the
form's own sentence, not Gradio's "Value 0 is less than minimum value 1.", in the tab's status line; Compare with no adapter yet says
where adapters come from."""
from __future__ import annotations

import pytest

from studio.tabs import compare, data
from studio_helpers import _prepare
from studio_server import served_studio
from test_hostile_inputs_r3 import _call, _data, _endpoints

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.mark.parametrize("name", ["", "my-data", "bad name!"])
def test_prepare_with_no_text_asks_for_text_whatever_the_name(studio, name):
    with pytest.raises(ValueError, match=r"^add some text first"):
        data.prepare(studio, None, "", 0.9, name)


def test_compare_with_no_adapter_yet_says_to_train_one(studio):
    form = compare.CompareForm(model="tiny", adapters=[], include_base=False, prompt="Ahoy")
    with pytest.raises(ValueError, match="train one on the Train tab"):
        next(compare.compare(studio, form))
    assert "train one on the Train tab" in compare.adapter_choices(studio, "tiny")["info"]


def test_steps_zero_through_the_api_gets_one_sentence(tmp_path):
    with served_studio(tmp_path, before_build=_prepare) as (url, studio):
        dep, params = next((d, p) for d, p in _endpoints(url) if d["api_name"] == "start_training")
        sent = {p["parameter_name"]: p.get("parameter_default") for p in params}
        sent.update(model="tiny", dataset="pirates", name="zero", steps=0)
        warnings, done = _call(url, dep, _data(url, dep, list(sent.values())))
        assert studio.runs.jobs() == []
    error = (done.get("output") or {}).get("error")
    assert error is None and warnings == ["Steps must be a whole number from 1 to 1000000 (got 0)."]
    # on the page it replaces the Train tab's action line (its one status line), not a toast beside a stale line
    assert done["output"]["data"][0] == "⚠ Steps must be a whole number from 1 to 1000000 (got 0)."


def test_compare_and_evaluate_refusals_replace_their_tabs_status_line(tmp_path):
    """Compare's refusal lands in its model status line and Evaluate's in its summary, through the served API:
    one place for messages per tab, the warning kept for API clients."""
    with served_studio(tmp_path) as (url, studio):
        eps = {d["api_name"]: (d, p) for d, p in _endpoints(url)}

        def call(api, **values):
            dep, params = eps[api]
            sent = {p["parameter_name"]: p.get("parameter_default") for p in params}
            sent.update(values)
            warnings, done = _call(url, dep, _data(url, dep, list(sent.values())))
            return warnings, done["output"]["data"]

        warnings, out = call("compare", model="tiny", adapters=[], include_base=False, prompt="Ahoy")
        assert any("train one on the Train tab" in w for w in warnings)
        assert out[-1].startswith("⚠ ") and "train one on the Train tab" in out[-1]
        warnings, out = call("evaluate", model="tiny", adapters=[], include_base=False, source="Pasted text", text="")
        assert warnings and out[-1] == "⚠ " + warnings[0]
