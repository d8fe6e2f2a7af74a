"""The Teacher tab in real browsers (issue 29): the teacher sees every student's job, stops alice's run from the
panel, and alice's own Train tab says the teacher stopped it. Sign-in as in test_browser_classroom."""
from __future__ import annotations

import os
import re

import pytest
from gradio_client import Client

from studio.tabs import data
from studio_server import served_studio
from test_browser_classroom import ARGS, ARTIFACTS, CHROMIUM, README_SHOTS, sign_in, sync_api

pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
USERS = [("teacher", "pw-teacher"), ("alice", "pw-alice"), ("bob", "pw-bob")]
LONG_RUN = ["attn.c_attn"], 4, 8, 0.0, 2e-3, 100_000, 2, 1, 32, 0, 7, "Ahoy"  # until stopped


def test_the_teacher_stops_a_students_run_from_the_panel_and_she_sees_who(tmp_path):
    def prepare(studio):
        studio.admins = frozenset({"teacher"})
        studio.runner.scheduler.capacity_tokens = 64  # one job at a time: bob's waits in the queue
        text, _, state = data.sample_text("pirate_recipes")
        data.prepare(studio, state, text, 0.9, "pirates")

    with served_studio(tmp_path, auth=USERS, before_build=prepare) as (url, studio), \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for (user, pw), run in zip(USERS[1:], ("alice-run", "bob-run")):
            client = Client(url, auth=(user, pw), verbose=False)
            client.predict("tiny", "pirates", run, *LONG_RUN, api_name="/start_training")
            client.close()
        teacher, alice = sign_in(browser, url, *USERS[0]), sign_in(browser, url, *USERS[1])
        teacher.click("#tab-teacher-button")  # the tab's select fills the panel
        teacher.wait_for_function("() => document.querySelector('#teacher-jobs').innerText.includes('bob-run')",
                                  timeout=60_000)
        teacher.click("#teacher-job input")
        teacher.get_by_role("option", name=re.compile("alice-run")).first.click()
        teacher.mouse.click(5, 5)  # away from the list, which closes
        teacher.wait_for_function("() => !document.querySelector('#teacher-job').innerText.includes('bob-run')",
                                  timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        shots = [ARTIFACTS / "teacher.png"] + ([README_SHOTS / "teacher.png"]
                                               if os.environ.get("UPDATE_README_SCREENSHOTS") else [])
        for shot in shots:
            teacher.screenshot(path=str(shot), full_page=True)
        teacher.click("#teacher-stop")
        teacher.wait_for_function("() => document.querySelector('#teacher-status').innerText.includes("
                                  "\"Stopping 'alice-run'\")", timeout=30_000)
        alice.click("#tab-train-button")  # her card follows her newest job
        alice.wait_for_function("() => document.querySelector('#train-job').innerText.includes("
                                "'Stopped by the teacher (teacher).')", timeout=120_000)
        assert studio.runner.training("alice-run") is None
        browser.close()
