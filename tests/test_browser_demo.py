"""The public demo in two real browser contexts (two visitors, no sign-in; Playwright + Debian's chromium,
headless): each page says it is a private sandbox, each visitor prepares a dataset on the Data tab, and each
Train tab offers only that visitor's own, also after a reload (the visitor cookie keeps the sandbox)."""
from __future__ import annotations

import pytest

from studio.demo import COOKIE
from studio.tabs import data
from studio_server import served_studio
from test_browser_classroom import ARGS, CHROMIUM  # skips this module where chromium is missing
from test_browser_privacy import dataset_options

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def demo_space(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("demo"), demo={"idle_minutes": 45}) as served:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            yield served, browser
            browser.close()


def visit(browser, url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(url)
    page.wait_for_function("() => document.querySelector('#identity')?.innerText.includes('private sandbox')",
                           timeout=60_000)
    return context, page


def prepare(page, name: str, text: str) -> None:
    for elem_id, value in (("data-text", text), ("data-name", name)):
        box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
        box.fill(value)
        box.press("Tab")
    page.click("#data-prepare")
    page.wait_for_selector("#data-status :text('Saved dataset')", timeout=60_000)


def test_two_visitors_each_see_only_their_own_sandbox(demo_space):
    (url, studio), browser = demo_space
    (ann_ctx, ann), (bob_ctx, bob) = visit(browser, url), visit(browser, url)
    assert "kept 45 minutes after your last visit" in ann.inner_text("#identity")
    secrets = [next(c["value"] for c in ctx.cookies() if c["name"] == COOKIE) for ctx in (ann_ctx, bob_ctx)]
    assert secrets[0] != secrets[1]
    text, _, _ = data.sample_text("pirate_recipes")
    prepare(ann, "ann-notes", text)
    prepare(bob, "bob-notes", text)
    for page, mine, theirs in ((ann, "ann-notes", "bob-notes"), (bob, "bob-notes", "ann-notes")):
        picked, options = dataset_options(page)
        assert picked.startswith(mine) and not any(theirs in o for o in options), options
    ann.reload()  # the same browser is the same visitor: her sandbox is still hers
    ann.wait_for_selector("#identity", timeout=60_000)
    picked, options = dataset_options(ann)
    assert picked.startswith("ann-notes") and not any("bob-notes" in o for o in options), options
    owners = {d["name"]: d["meta"]["user"] for d in studio.dataset_store.list()}
    assert owners["ann-notes"] != owners["bob-notes"] and all(o.startswith("visitor:") for o in owners.values())
