"""Instruction data in a real browser (Playwright + Debian's chromium, headless), on the tiny model:
import a .jsonl file (pickers, preview, greyed prompt tokens) -> prepare -> train -> evaluate (response
tokens only) -> token differences. Screenshots go to artifacts/; with UPDATE_README_SCREENSHOTS=1 the
README's instruction-data screenshots are rewritten in docs/screenshots/."""
from __future__ import annotations

import json
import os

import pytest

from test_browser import ARGS, ARTIFACTS, CHROMIUM, README_SHOTS, VIEWPORT, _fill, _pick, _shot, _tab, _value, server  # noqa: F401

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def test_import_jsonl_train_evaluate_and_colour_tokens(server, browser, tmp_path):
    url, studio = server
    rows = [{"instruction": f"Name colour number {i}.", "output": ["red", "green", "blue"][i % 3]} for i in range(40)]
    f = tmp_path / "colours.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(30_000)
    page.goto(url)

    # 1. Data: the records section reads the file, preselects the fields and greys out prompt tokens
    page.click("#data-records button, #data-records .label-wrap")
    page.set_input_files("#rec-file input[type=file]", str(f))
    page.wait_for_selector("#rec-tokens .tok-masked")
    assert _value(page, "rec-prompt") == "instruction" and _value(page, "rec-response") == "output"
    assert "Name colour number 0." in page.inner_text("#rec-preview")
    assert page.locator("#rec-tokens .tok-masked").count() > page.locator("#rec-tokens .tok-c0").count() > 0
    _fill(page, "rec-name", "colours")
    page.click("#rec-prepare")
    page.wait_for_selector("#rec-status :text('Saved instruction dataset')")
    page.locator("#data-records").scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#data-records").screenshot(path=str(ARTIFACTS / "6-instruction-data.png"))
    if os.environ.get("UPDATE_README_SCREENSHOTS"):
        page.locator("#data-records").screenshot(path=str(README_SHOTS / "instruction-data.png"))

    # 2. Train on it
    _tab(page, "2 · Train")
    _pick(page, "train-dataset", "colours")
    _fill(page, "train-name", "colour-lora")
    _fill(page, "train-steps", 20)
    _fill(page, "train-seq", 32)
    _fill(page, "train-eval", 10)
    page.click("#train-start")
    page.wait_for_selector("#train-job .badge.finished", timeout=180_000)

    # 3. Evaluate on its validation split: response tokens only
    _tab(page, "5 · Evaluate")
    page.click("#ev-refresh")
    _pick(page, "ev-adapters", "colour-lora")
    _pick(page, "ev-dataset", "colours")
    page.click("#ev-run")
    page.wait_for_selector("#ev-summary :text('response tokens only')", timeout=60_000)
    assert "colour-lora" in page.inner_text("#ev-table")

    # 4. Token differences on a templated example
    _pick(page, "ev-diff-adapter", "colour-lora")
    _fill(page, "ev-diff-text", "### Instruction:\nName colour number 3.\n\n### Response:\nred")
    page.click("#ev-diff-run")
    page.wait_for_selector("#ev-diff-view .dtok")
    _shot(page, "7-instruction-evaluate", readme="instruction-evaluate.png", full=True)
