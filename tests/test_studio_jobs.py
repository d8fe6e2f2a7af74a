"""Many users' training jobs through the Train tab's handlers: they train together on the loaded base,
queue beyond the capacity in order, count against a per-user limit, and only their owner (or an admin)
stops them. Owners here are browser ids, as pages without sign-in send them."""
from __future__ import annotations

import pytest

from studio.app import create_studio
from studio.tabs import train
from studio_helpers import FAST, _form, _prepare, _wait_for

ANN, BOB, CY = "browser:" + "a" * 32, "browser:" + "b" * 32, "browser:" + "c" * 32


def _start(studio, name, steps, owner, **over):
    form = _form(model="tiny", dataset="pirates", name=name, steps=steps, **{**FAST, **over})
    return train.start(studio, form, owner=owner)


@pytest.fixture
def small(tmp_path):
    """A studio whose shared step holds one FAST job (2 x 32 tokens): the next waits."""
    s = create_studio(tmp_path / "lib", tmp_path / "datasets", "cpu", "tiny", train_capacity=64)
    _prepare(s)
    yield s
    s.runs.stop_all(60)


def test_two_browsers_train_together_and_each_sees_whose_job_is_whose(studio):
    _prepare(studio)
    _start(studio, "anns", 5000, ANN)
    msg, _ = _start(studio, "bobs", 5000, BOB)
    assert "Started **bobs**" in msg  # room in the shared step: no queue
    assert _wait_for(lambda: all(len(studio.runs.snapshot(None, o)["points"]) >= 2 for o in (ANN, BOB)))
    assert [j.state for j in studio.runs.jobs()] == ["running", "running"]
    rows = {row[2]: row for row in train.jobs_table(studio, ANN)}
    assert rows["anns"][1] == "you" and rows["bobs"][1] == "another browser"
    html = train.job_html({**studio.runs.snapshot(None, BOB), "together": 1})
    assert "bobs" in html and "Trains in one shared step with 1 other job" in html
    # each page follows its own job by default, and a reloaded page (same browser id) finds it again
    assert studio.runs.snapshot(None, ANN)["name"] == "anns"
    assert train.live_view(studio, None, None, BOB)[5][0].startswith(str(studio.runs.training("bobs").id))
    # bob may not stop ann's job; each stops their own
    anns = studio.runs.training("anns").id
    with pytest.raises(ValueError, match="was started by someone else; only they"):
        train.stop(studio, job_id=anns, owner=BOB)
    assert "Stopping 'bobs'" in train.stop(studio, owner=BOB)
    assert _wait_for(lambda: studio.runs.snapshot(None, BOB)["state"] == "stopped")
    assert studio.runs.training("anns").state == "running"
    assert "Stopping 'anns'" in train.stop(studio, job_id=anns, owner=ANN)


def test_jobs_beyond_the_capacity_wait_in_order_and_start_when_room_frees(small):
    studio = small
    _start(studio, "first", 30, ANN)
    assert _wait_for(lambda: studio.runs.snapshot(None, ANN)["state"] == "running")
    msg, _ = _start(studio, "second", 3, BOB)
    assert msg.startswith("Queued **second**: waiting for room: the running jobs fill")
    msg, _ = _start(studio, "third", 3, CY)
    assert msg.startswith("Queued **third**: waiting for room")  # as big as second: it starts after it
    third = studio.runs.snapshot(None, CY)
    assert third["state"] == "queued" and third["position"] == 2
    html = train.job_html(third)
    assert "waits in the queue: position" in html
    studio.runs.wait(180)
    snaps = {j.name: j.snapshot() for j in studio.runs.jobs()}
    assert all(s["state"] == "finished" for s in snaps.values()), snaps
    assert snaps["first"]["ended"] <= snaps["second"]["started"] <= snaps["second"]["ended"] \
        <= snaps["third"]["started"]


def test_the_per_user_limit_comes_from_the_flag(tmp_path):
    studio = create_studio(tmp_path / "lib", tmp_path / "datasets", "cpu", "tiny", max_jobs_per_user=2)
    _prepare(studio)
    try:
        _start(studio, "one", 5000, ANN)
        _start(studio, "two", 5000, ANN)
        with pytest.raises(ValueError, match=r"you already have 2 training jobs queued or running \('one', 'two'\); "
                                             r"the limit is 2 per user"):
            _start(studio, "three", 5000, ANN)
        assert not (studio.library.root / "three").exists()  # the refused job's name is free again
        with pytest.raises(ValueError, match=r"the limit is 2 per user"):  # Start pressed again: the limit, not
            _start(studio, "two", 5000, ANN)                                # "'two' already exists"
    finally:
        studio.runs.stop_all(60)
    with pytest.raises(ValueError, match="--max-jobs-per-user must be a whole number of at least 1"):
        create_studio(tmp_path / "lib2", tmp_path / "ds2", "cpu", "tiny", max_jobs_per_user=0)


def test_a_page_on_another_tab_hears_once_that_its_job_ended(small):
    from studio import job_notice
    studio = small
    _start(studio, "quick", 2, ANN)
    _start(studio, "long", 5000, BOB)
    ann, bob = job_notice.live_jobs(studio, ANN), job_notice.live_jobs(studio, BOB)
    assert len(ann) == len(bob) == 1 and job_notice.live_jobs(studio, None) == []
    assert job_notice.ended(studio, bob) == ([], bob)  # still training: nothing to say
    studio.runs.scheduler.stop(studio.runs.training("long"), by="teacher")
    studio.runs.wait(60)
    assert job_notice.ended(studio, ann) == (["Your training job 'quick' is saved to the library; the Train tab "
                                              "shows it."], [])
    assert job_notice.ended(studio, bob) == (["Your training job 'long' stopped and is saved to the library "
                                              "(stopped by the teacher (teacher)); the Train tab shows it."], [])
