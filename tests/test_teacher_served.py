"""The Teacher tab through the served studio's API, as a class uses it (issue 29): only the teacher (an admin)
can list, stop, cancel and reorder jobs; a job the teacher stops tells its student who stopped it; moving a
queued job changes the order jobs start in. One job trains at a time here (the step's capacity is one job)."""
from __future__ import annotations

import pytest
from gradio_client import Client

from studio.tabs import data
from studio.tabs.train import job_html
from studio_server import served_studio

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
USERS = [("teacher", "pw-teacher"), ("alice", "pw-alice"), ("bob", "pw-bob"), ("carol", "pw-carol")]
# targets, rank, alpha, dropout, lr, steps, batch, accum, seq_len, eval interval, seed, prompt
LONG_RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 100_000, 2, 1, 32, 0, 7, "Ahoy"  # 2 x 32 tokens a step, until stopped
SHORT_RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 2, 2, 1, 32, 0, 7, "Ahoy"


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    def prepare(studio):
        studio.admins = frozenset({"teacher"})
        studio.runs.scheduler.capacity_tokens = 64  # one of these jobs at a time: the others queue
        text, _, state = data.sample_text("pirate_recipes")
        data.prepare(studio, state, text, 0.9, "pirates")

    with served_studio(tmp_path_factory.mktemp("teacher"), auth=USERS, before_build=prepare) as served:
        url, studio = served
        clients = {u: Client(url, auth=(u, p), verbose=False) for u, p in USERS}
        yield studio, clients
        for c in clients.values():
            c.close()


def _start(client, name, run=LONG_RUN):
    msg, started, *_ = client.predict("tiny", "pirates", name, *run, api_name="/start_training")
    assert started == name, msg


def _rows(table) -> list[list]:
    return table["data"] if isinstance(table, dict) else table


def test_a_student_cannot_use_the_teachers_panel(classroom):
    studio, c = classroom
    _start(c["alice"], "alice-run")
    job = studio.runs.training("alice-run")
    refusal = "Only the teacher (an admin) can use the Teacher panel."
    status, jobs, overview, _ = c["bob"].predict("", api_name="/teacher_jobs")
    assert status == refusal and _rows(jobs) == [] and _rows(overview) == []  # an empty panel
    for endpoint in ("/teacher_stop", "/teacher_cancel"):
        assert c["bob"].predict("", str(job.id), api_name=endpoint)[0] == refusal
    assert c["bob"].predict("", api_name="/teacher_stop_all")[0] == refusal
    assert c["bob"].predict("", str(job.id), -1, api_name="/teacher_move") == refusal
    assert job.live and not job.stop_flag.is_set()
    status, jobs, _, _ = c["teacher"].predict("", api_name="/teacher_jobs")
    assert [(r[0], r[1], r[2]) for r in _rows(jobs)] == [(job.id, "alice", "alice-run")]
    studio.runs.stop_all()


def test_the_teacher_stops_a_students_job_and_the_student_sees_who(classroom):
    studio, c = classroom
    _start(c["alice"], "alice-stopped")
    job = studio.runs.training("alice-stopped")
    status, *_ = c["teacher"].predict("", str(job.id), api_name="/teacher_stop")
    assert status.startswith("Stopping 'alice-stopped'")
    assert job.wait(120)
    snap = studio.runs.snapshot(job.id)
    assert snap["state"] == "stopped" and snap["stopped_by"] == "teacher"
    assert snap["message"] == "stopped by the teacher (teacher); saved to the library as 'alice-stopped'"
    assert "Stopped by the teacher (teacher)." in job_html(snap)  # the student's job card


def test_moving_a_queued_job_up_makes_it_start_first(classroom):
    studio, c = classroom
    _start(c["alice"], "alice-long")
    running = studio.runs.training("alice-long")
    _start(c["bob"], "bob-short", SHORT_RUN)
    _start(c["carol"], "carol-short", SHORT_RUN)
    bob, carol = studio.runs.training("bob-short"), studio.runs.training("carol-short")
    assert (bob.position, carol.position) == (1, 2)
    assert c["teacher"].predict("", str(carol.id), -1, api_name="/teacher_move") == \
        "'carol-short' is now number 1 in the queue."
    _, jobs, _, _ = c["teacher"].predict("", api_name="/teacher_jobs")
    assert [(r[2], r[6]) for r in _rows(jobs)][:3] == [("alice-long", ""), ("carol-short", 1), ("bob-short", 2)]
    c["teacher"].predict("", str(running.id), api_name="/teacher_stop")
    assert bob.wait(120) and carol.wait(1)
    assert carol.snapshot()["started"] <= bob.snapshot()["started"]
    assert [bob.snapshot()["state"], carol.snapshot()["state"]] == ["finished", "finished"]


def test_without_sign_in_the_panel_needs_the_admin_token(tmp_path):
    from studio.app import create_studio
    from studio.tabs.teacher import teacher_of
    token = "correct-horse-battery-staple"
    studio = create_studio(tmp_path / "a", tmp_path / "d", "cpu", "tiny", admin_token=token)
    assert teacher_of(studio, None, token) == ""  # a stopped job says 'stopped by the teacher'
    for wrong in ("", token + "x", None, 7):
        with pytest.raises(ValueError, match="enter the admin token"):
            teacher_of(studio, None, wrong)
    studio.admin_token = None
    with pytest.raises(ValueError, match="needs the server started with --admin-token"):
        teacher_of(studio, None, token)


def test_a_move_by_anything_but_a_whole_number_is_explained(tmp_path):
    from studio.app import create_studio
    from studio.tabs.teacher import move_job
    token = "correct-horse-battery-staple"
    studio = create_studio(tmp_path / "a", tmp_path / "d", "cpu", "tiny", admin_token=token)
    for delta in (float("inf"), float("nan"), 0.5, True, 0, "1"):  # inf and NaN have no int(): never a crash
        with pytest.raises(ValueError, match="move by a whole number of places"):
            move_job(studio, "1", delta, None, token)


def test_the_teacher_changes_the_caps_while_the_studio_runs_and_nobody_else_can(classroom):
    from studio import caps
    studio, c = classroom
    before = caps.current(studio)
    status, *_ = c["bob"].predict("", 5, 8, 0, 0, api_name="/teacher_caps")
    assert status == "⚠ Only the teacher (an admin) can use the Teacher panel." and caps.current(studio) == before
    status, *_ = c["teacher"].predict("", 0, 8, 0, 0, api_name="/teacher_caps")
    assert status.startswith("⚠ Jobs per user must be a whole number from 1") and caps.current(studio) == before
    try:
        status, *_ = c["teacher"].predict("", 2, 3, 0, 0, api_name="/teacher_caps")
        assert status.startswith("Caps changed for the next submissions: 2 training jobs per user")
        assert caps.current(studio) == caps.Caps(2, 3, None, None) and studio.engine.max_rows_per_user == 3
        _start(c["alice"], "alice-one")
        _start(c["alice"], "alice-two")  # a second job of hers is let in now
        c["teacher"].predict("", 2, 3, 0, 50, api_name="/teacher_caps")
        c["bob"].predict("tiny", "pirates", "bob-long", *LONG_RUN, api_name="/start_training")
        assert studio.runs.training("bob-long") is None  # 100,000 steps: over the new 50 a job may train
        c["teacher"].predict("", api_name="/teacher_stop_all")
        studio.runs.wait(120)  # alice-one is saved; alice-two left the queue with nothing trained
        _, _, overview, _ = c["teacher"].predict("", api_name="/teacher_jobs")
        latest = {row[0]: row for row in _rows(overview)}  # the class overview: each student's latest run
        assert latest["alice"][1] == "alice-one" and latest["alice"][6] == "stopped"
    finally:
        caps.apply(studio, before)
        studio.runs.stop_all()
