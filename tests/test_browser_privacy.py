"""Private by default in two real browsers (alice and bob signed in; Playwright + Debian's chromium, headless):
bob's Train tab never offers alice's dataset, nor picks it after a reload, while alice's offers and picks it;
bob's Library does not list alice's adapter until she ticks "Share with the class"."""
from __future__ import annotations

import pytest

from core.lora.config import LoraConfig
from core.model.weights import load_base
from studio.tabs import data
from adapter_helpers import make_adapter
from studio_server import served_studio
from test_browser_classroom import ARGS, CHROMIUM, sign_in  # skips this module where chromium is missing

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
USERS = [("alice", "pw-alice"), ("bob", "pw-bob")]


@pytest.fixture(scope="module")
def two_students(tmp_path_factory):
    text, _, state = data.sample_text("pirate_recipes")

    def prepare(studio):
        data.prepare(studio, state, text, 0.9, "old-notes")  # before sign-in was turned on: everyone's
        data.prepare(studio, state, text, 0.9, "alice-notes", "alice")
        model = load_base("tiny", "cpu")
        make_adapter(model, "alice-pirate", LoraConfig(r=4, alpha=8.0), std=0.5)
        studio.library.save(model, "alice-pirate", "alice-pirate", LoraConfig(r=4, alpha=8.0), "tiny",
                            meta={"user": "alice"})

    with served_studio(tmp_path_factory.mktemp("private"), auth=USERS, before_build=prepare) as served:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            yield served, browser
            browser.close()


def dataset_options(page) -> tuple[str, list[str]]:
    """(the picked dataset, every option) of the Train tab's dataset dropdown, as the user sees it."""
    page.click("#tab-train-button")
    page.wait_for_function("() => document.querySelector('#train-dataset input').value !== ''", timeout=60_000)
    picked = page.input_value("#train-dataset input")
    page.click("#train-dataset input")
    page.wait_for_selector("[role=option]", timeout=30_000)
    options = [o.inner_text() for o in page.query_selector_all("[role=option]")]
    page.keyboard.press("Escape")
    return picked, options


def library_names(page) -> str:
    page.click("#tab-library-button")
    page.wait_for_selector("#lib-table", timeout=30_000)
    return page.inner_text("#lib-table")


def test_bobs_lists_never_show_alices_work_until_she_shares_it(two_students):
    (url, studio), browser = two_students
    alice, bob = (sign_in(browser, url, u, p) for u, p in USERS)
    picked, options = dataset_options(bob)
    assert picked.startswith("old-notes") and not any("alice-notes" in o for o in options), options
    assert any("old-notes" in o for o in options)
    bob.reload()  # a reloaded page picks again: still never alice's dataset
    bob.wait_for_selector("#identity", timeout=60_000)
    picked, options = dataset_options(bob)
    assert picked.startswith("old-notes") and not any("alice-notes" in o for o in options), options
    picked, options = dataset_options(alice)
    assert picked.startswith("alice-notes") and any("old-notes" in o for o in options)

    assert "alice-pirate" not in library_names(bob)
    library_names(alice)
    picked = "() => document.querySelector('#lib-picked input').value === 'alice-pirate'"
    for _ in range(5):  # the table may redraw once after the tab opens: click until picked
        alice.locator("#lib-table span.text").filter(has_text="alice-pirate").first.click()
        try:
            alice.wait_for_function(picked, timeout=3_000)
            break
        except sync_api.TimeoutError:
            continue
    alice.wait_for_selector("#lib-details :text('alice')", timeout=30_000)
    alice.click("#lib-share input")
    alice.wait_for_function("() => document.querySelector('#lib-status').innerText.includes('shared with the class')",
                            timeout=30_000)
    assert studio.library.details("alice-pirate")["shared"] is True
    bob.click("#lib-refresh")
    bob.wait_for_function("() => document.querySelector('#lib-table').innerText.includes('alice-pirate')",
                          timeout=30_000)
