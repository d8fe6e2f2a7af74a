"""A class in three real browsers (teacher, alice, bob; Playwright + Debian's chromium, headless): each page
says who is signed in (the teacher with an admin badge), and a whole blind arena round runs through the page:
the teacher opens it, both students vote on anonymous pairs (the names show only after each vote, never
their own adapter), and the leaderboard counts every vote."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from core.arena import BASE
from studio_server import served_studio
from test_arena_served import USERS, two_students_adapters

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
README_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@pytest.fixture(scope="module")
def classroom(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("class"), auth=USERS, before_build=two_students_adapters) as served:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            yield served, browser
            browser.close()


def sign_in(browser, url, user, password, page=None):
    """A page signed in as `user` (in a new browser context, or on `page` after signing its user out)."""
    if page is None:
        page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
        page.goto(url)
    else:
        page.goto(url.rstrip("/") + "/logout")
    page.get_by_label(re.compile("username", re.I)).fill(user)
    page.get_by_label(re.compile("password", re.I)).fill(password)
    page.get_by_role("button", name=re.compile("login", re.I)).click()
    page.wait_for_selector("#identity", timeout=60_000)
    page.wait_for_function(f"() => document.querySelector('#identity').innerText.includes('{user}')",
                           timeout=60_000)
    return page


def vote_all(page, student):
    """Vote 'A is better' on every pair the page is handed; the reveals it showed."""
    page.click("#tab-arena-button")
    # the tab's select brings the rounds opened since the page loaded
    page.wait_for_function("() => document.querySelector('#arena-round input').value.includes('open')",
                           timeout=60_000)
    reveals = []
    for _ in range(10):
        page.click("#arena-next")
        page.wait_for_function("""() => { const s = document.querySelector('#arena-status').innerText;
            return s.includes('Read both') || s.includes('every pair'); }""", timeout=60_000)
        if "every pair" in page.inner_text("#arena-status"):
            return reveals
        a, b = page.input_value("#arena-a textarea"), page.input_value("#arena-b textarea")
        assert a and b and a != b
        assert "alice-pirate" not in page.inner_text("#arena-status")  # hidden until the vote
        page.click("#arena-vote-a")
        page.wait_for_function("() => document.querySelector('#arena-status').innerText.includes('A was')",
                               timeout=30_000)
        reveals.append(page.inner_text("#arena-status"))
    raise AssertionError(f"{student} kept getting pairs")


def test_identity_chips_and_a_whole_arena_round_in_three_browsers(classroom):
    (url, studio), browser = classroom
    teacher, alice, bob = (sign_in(browser, url, u, p) for u, p in USERS)
    assert "admin" in teacher.inner_text("#identity") and "sign out" in teacher.inner_text("#identity")
    assert "admin" not in alice.inner_text("#identity")
    teacher.click("#tab-arena-button")
    teacher.click("#arena-teacher")  # the accordion
    teacher.fill("#arena-prompts textarea", "Once upon a time\nAhoy")
    for m in (BASE, "alice-pirate", "bob-bard"):
        teacher.click("#arena-models input")
        teacher.get_by_role("option", name=m).first.click()
    teacher.fill("#arena-max input[type=number]", "12")
    teacher.click("#arena-open")
    teacher.wait_for_function("() => document.querySelector('#arena-status').innerText.includes('is open')",
                              timeout=60_000)
    (rnd,) = studio.arena.rounds()
    for page, me in ((alice, "alice-pirate"), (bob, "bob-bard")):
        reveals = vote_all(page, me)
        assert len(reveals) == 2 and not any(me in r for r in reveals)
    teacher.click("#arena-refresh")
    teacher.wait_for_function("() => document.querySelector('#arena-board').innerText.includes('alice-pirate')",
                              timeout=30_000)
    assert len(studio.arena.get(rnd.id).votes) == 4
    ARTIFACTS.mkdir(exist_ok=True)
    idle = "() => !document.body.innerText.includes('processing')"
    bob.wait_for_function(idle, timeout=30_000)
    shots = [ARTIFACTS / "arena.png"] + ([README_SHOTS / "arena.png"] if os.environ.get("UPDATE_README_SCREENSHOTS")
                                          else [])
    for shot in shots:  # a student's page after their last vote: the reveal and the leaderboard
        bob.screenshot(path=str(shot), full_page=True)
    board = [ARTIFACTS / "arena-leaderboard.png"] + (
        [README_SHOTS / "arena-leaderboard.png"] if os.environ.get("UPDATE_README_SCREENSHOTS") else [])
    teacher.wait_for_function(idle, timeout=30_000)
    for shot in board:  # the teacher's leaderboard: every adapter's strength, interval and votes
        teacher.locator("#arena-board").screenshot(path=str(shot))
