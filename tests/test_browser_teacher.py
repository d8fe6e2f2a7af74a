"""The Teacher tab in real browsers (issue 29): the teacher sees every student's job, moves a queued job up, stops
alice's run from the panel, and alice's own Train tab says the teacher stopped it. A reload gives alice back her
page (the tab, the job she followed, the form and the dataset she picked), and bob, signing in next on the same
browser, gets his own page, not hers. Sign-in as in test_browser_classroom."""
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


def pick(page, dropdown: str, option: str) -> None:
    """Choose `option` (a regex) in a dropdown, and close its list."""
    page.click(f"{dropdown} input")
    page.get_by_role("option", name=re.compile(option)).first.click()
    page.mouse.click(5, 5)  # away from the list, which closes


def text_in(page, selector: str, text: str, timeout=60_000) -> None:
    page.wait_for_function(f"() => document.querySelector({selector!r})?.innerText.includes({text!r})",
                           timeout=timeout)


def test_the_teacher_reorders_the_queue_and_stops_a_students_run_from_the_panel_and_she_sees_who(tmp_path):
    def prepare(studio):
        studio.admins = frozenset({"teacher"})
        studio.runs.scheduler.capacity_tokens = 64  # one job at a time: the others wait in the queue
        text, _, state = data.sample_text("pirate_recipes")
        data.prepare(studio, state, text, 0.9, "pirates")
        data.prepare(studio, state, text, 0.9, "alice-notes", "alice")  # her own newest: picked unless she chooses

    with served_studio(tmp_path, auth=USERS, before_build=prepare) as (url, studio), \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for (user, pw), run in zip(USERS[1:] + USERS[:1], ("alice-run", "bob-run", "teacher-run")):
            client = Client(url, auth=(user, pw), verbose=False)
            client.predict("tiny", "pirates", run, *LONG_RUN, api_name="/start_training")
            client.close()
        teacher, alice = sign_in(browser, url, *USERS[0]), sign_in(browser, url, *USERS[1])
        teacher.click("#tab-teacher-button")  # the tab's select fills the panel
        text_in(teacher, "#teacher-jobs", "teacher-run")
        pick(teacher, "#teacher-job", "teacher-run")
        teacher.click("#teacher-up")  # queue reorder: teacher-run passes bob-run
        text_in(teacher, "#teacher-status", "'teacher-run' is now number 1 in the queue.")
        assert (studio.runs.training("teacher-run").position, studio.runs.training("bob-run").position) == (1, 2)
        pick(teacher, "#teacher-job", "alice-run")
        teacher.wait_for_function("() => !document.querySelector('#teacher-job').innerText.includes('bob-run')",
                                  timeout=10_000)
        ARTIFACTS.mkdir(exist_ok=True)
        shots = [ARTIFACTS / "teacher.png"] + ([README_SHOTS / "teacher.png"]
                                               if os.environ.get("UPDATE_README_SCREENSHOTS") else [])
        for shot in shots:
            teacher.screenshot(path=str(shot), full_page=True)
        teacher.click("#teacher-stop")
        text_in(teacher, "#teacher-status", "Stopping 'alice-run'", 30_000)
        alice.click("#tab-train-button")  # her card follows her newest job
        text_in(alice, "#train-job", "Stopped by the teacher (teacher).", 120_000)
        assert studio.runs.training("alice-run") is None

        # a reload keeps alice's page: the Train tab, the job she follows, the form and her dataset choice
        pick(alice, "#train-follow", "bob-run")
        text_in(alice, "#train-job", "bob-run")
        pick(alice, "#train-dataset", "^pirates")
        alice.fill("#train-steps input", "321")
        alice.press("#train-steps input", "Tab")
        text_in(alice, "#train-estimate", "for 321 steps")  # drawn by a queued event the same change set off
        alice.reload()
        alice.wait_for_function("() => document.querySelector('#train-steps input')?.value === '321'",
                                timeout=60_000)
        assert alice.get_attribute("#tab-train-button", "aria-selected") == "true"
        assert alice.input_value("#train-dataset input").startswith("pirates")
        text_in(alice, "#train-job", "bob-run")  # the followed job's card, drawn by the running timer
        # bob signs in next on the same browser: his own page, none of alice's choices
        bob = sign_in(browser, url, *USERS[2], page=alice)
        bob.click("#tab-train-button")
        bob.wait_for_function("() => document.querySelector('#train-dataset input')?.value", timeout=60_000)
        assert bob.input_value("#train-steps input") == "200" and "bob-run" not in bob.input_value("#train-follow input")
        browser.close()
