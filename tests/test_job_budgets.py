"""Per-job budgets (issue 29, fair turns): --max-job-steps refuses a longer job at Start in one sentence,
--max-job-minutes is passed to the scheduler (which stops and saves a job at the limit: test_train_jobs), and
both are shown on the Train tab before Start."""
from __future__ import annotations

import pytest

from studio.app import create_studio
from studio.tabs.train import limit_note
from train_helpers import quick


@pytest.fixture
def budgeted(tmp_path):
    studio = create_studio(tmp_path / "a", tmp_path / "d", "cpu", "tiny", max_job_steps=100, max_job_minutes=30)
    yield studio
    studio.runs.stop_all()


def test_the_limits_are_shown_before_start(budgeted):
    note = limit_note(budgeted)
    assert "at most 100 steps" in note and "at most 30 minutes, then it is stopped and saved" in note
    assert budgeted.runs.scheduler.max_job_minutes == 30


def test_a_job_over_the_step_limit_is_refused_in_one_sentence(budgeted, sample_ds):
    budgeted.runs.check_budget(sample_ds, quick(steps=100))  # at the limit: fine
    with pytest.raises(ValueError) as e:
        budgeted.runs.check_budget(sample_ds, quick(steps=101))
    assert str(e.value) == "this job would train 101 steps, more than the 100 one job may here; lower the steps " \
                           "to at most 100."
    with pytest.raises(ValueError, match="lower the steps to at most 150"):  # a resume counts the steps still to go
        budgeted.runs.check_budget(sample_ds, quick(steps=151), done=50)


def test_the_budget_flags_refuse_bad_values(tmp_path, capsys):
    import app
    base = ["--model", "tiny", "--library", str(tmp_path / "a"), "--datasets", str(tmp_path / "d")]
    for flag, value, said in (("--max-job-steps", "0", "--max-job-steps must be a whole number"),
                              ("--max-job-minutes", "0", "--max-job-minutes must be a number of minutes above 0"),
                              ("--max-job-minutes", "nan", "--max-job-minutes must be a number of minutes above 0")):
        assert app.main([*base, flag, value]) == 2
        assert said in capsys.readouterr().err
