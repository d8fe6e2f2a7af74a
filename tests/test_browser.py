"""The whole studio in a real browser (Playwright + Debian's chromium, headless), on the tiny model:
sample -> prepare -> train (the live chart gains points) -> stop -> library -> compare -> download.
A second browser context sees the first job in the jobs table, trains its own job beside it (both
charts update), cannot stop the first user's job, stops its own, and can still compare.

Screenshots of each tab go to artifacts/ (gitignored); with UPDATE_README_SCREENSHOTS=1 the README's two
are rewritten in docs/screenshots/.
"""
from __future__ import annotations

import os
import time
import zipfile
from pathlib import Path

import pytest

from studio_server import served_studio

CHROMIUM = "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),  # pandas notes from gradio's queue
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
README_SHOTS = ROOT / "docs" / "screenshots"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 900}
POINTS_JS = """() => { const p = document.querySelector('#train-chart .js-plotly-plot');
  return p && p.data && p.data[0] ? p.data[0].x.length : -1; }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with served_studio(tmp_path_factory.mktemp("studio")) as (url, studio):
        yield url, studio


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _pick(page, elem_id: str, option: str) -> None:
    """Choose `option` in the gr.Dropdown with elem_id."""
    page.click(f"#{elem_id} input")
    page.get_by_role("option", name=option).first.click()


def _fill(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    box.fill(str(value))
    box.press("Tab")


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def _tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()


def _shot(page, name: str, readme: str | None = None, full: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("() => window.scrollTo(0, 0)")
    page.mouse.move(0, 0)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if readme and os.environ.get("UPDATE_README_SCREENSHOTS"):  # else test runs would rewrite tracked files
        README_SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(README_SHOTS / readme), full_page=full)


def _points(page) -> int:
    return page.evaluate(POINTS_JS)


def _wait_points(page, more_than: int, timeout: float = 60) -> int:
    end = time.time() + timeout
    while time.time() < end:
        n = _points(page)
        if n > more_than:
            return n
        time.sleep(0.25)
    raise AssertionError(f"the live chart did not grow past {more_than} points (now {_points(page)})")


def test_full_journey(server, browser):
    url, studio = server
    ctx = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)

    # 1. Data: a bundled sample -> statistics and token view -> prepare
    _pick(page, "data-sample", "Captain Saltbeard")
    page.wait_for_selector("#data-tokens .tok")
    first = page.locator("#data-tokens .tok").first
    assert first.get_attribute("title").startswith("id ") and first.get_attribute("data-id").isdigit()
    page.wait_for_function("() => document.querySelector('#data-stats').innerText.includes('TOKENS')"
                           " || document.querySelector('#data-stats').innerText.includes('Tokens')")
    assert _value(page, "data-name") == "pirate_recipes"
    _fill(page, "data-name", "pirates")
    page.click("#data-prepare")
    page.wait_for_selector("#data-status :text('Saved dataset')")
    _shot(page, "1-data")

    # 2. Train: tiny, the new dataset is selected; start; the chart gains points and keeps updating
    _tab(page, "2 · Train")
    assert _value(page, "train-dataset").startswith("pirates")
    assert "noise until" in page.inner_text("#train-model-status")
    _fill(page, "train-name", "pirate-lora")
    page.click("#train-lora-settings button")  # the LoRA settings are folded away
    page.click("#train-targets label:has-text('mlp.c_fc')")
    _fill(page, "train-steps", 800)
    _fill(page, "train-seq", 64)
    _fill(page, "train-eval", 10)
    _fill(page, "train-prompt", "Ahoy")
    page.wait_for_function("() => document.querySelector('#train-estimate').innerText.includes('800 steps')")
    page.click("#train-start")
    page.wait_for_selector("#train-job .badge.running", timeout=60_000)
    n1 = _wait_points(page, 0)
    n2 = _wait_points(page, n1)  # the chart refreshes by itself (gr.Timer), no clicks
    assert n2 > n1 > 0
    _wait_points(page, 35)
    page.wait_for_selector("#train-samples .sample")
    job_text = page.inner_text("#train-job")
    assert "tokens/s" in job_text and "ETA" in job_text
    _shot(page, "2-train-running", readme="train.png")

    # a second browser context: sees the first job in the table, trains its own beside it
    other = browser.new_context(viewport=VIEWPORT)
    page2 = other.new_page()
    page2.set_default_timeout(30_000)
    page2.goto(url)
    _tab(page2, "2 · Train")
    page2.wait_for_function("() => document.querySelector('#train-jobs').innerText.includes('pirate-lora')")
    assert "another browser" in page2.inner_text("#train-jobs")  # browser ids are never shown
    _pick(page2, "train-dataset", "pirates")
    _fill(page2, "train-name", "visitor-lora")
    _fill(page2, "train-steps", 800)
    _fill(page2, "train-seq", 32)
    page2.click("#train-start")
    page2.wait_for_function("() => document.querySelector('#train-job').innerText.includes('visitor-lora')")
    page2.wait_for_selector("#train-job .badge.running", timeout=60_000)
    v1 = _wait_points(page2, 0)
    assert _wait_points(page2, v1) > v1  # its chart updates ...
    p1 = _points(page)
    assert _wait_points(page, p1) > p1  # ... and so does the first user's, at the same time
    assert "Trains in one shared step with 1 other job" in page2.inner_text("#train-job")
    _shot(page2, "5-second-user-training")
    # it may not stop the first user's job, only its own
    first_id = str(studio.runs.training("pirate-lora").id)
    _pick(page2, "train-follow", f"#{first_id} pirate-lora (running)")
    page2.wait_for_function("() => document.querySelector('#train-job').innerText.includes('pirate-lora')")
    page2.click("#train-stop")
    page2.wait_for_selector("#train-action :text('started by someone else')")
    assert studio.runs.training("pirate-lora").state == "running"
    visitor = studio.runs.training("visitor-lora")
    _pick(page2, "train-follow", f"#{visitor.id} visitor-lora (running)")
    page2.click("#train-stop")
    page2.wait_for_selector("#train-job .badge.stopped", timeout=60_000)
    assert visitor.snapshot()["state"] == "stopped"
    assert studio.runs.training("pirate-lora").state == "running"
    # its uploaded text stays in its own session
    note = ARTIFACTS / "visitor-notes.md"
    note.write_text("# Visitor notes\n" + "The visitor writes a few lines of their own. " * 20, "utf-8")
    _tab(page2, "1 · Data")
    page2.set_input_files("#data-files input[type=file]", str(note))
    page2.wait_for_function("() => document.querySelector('#data-stats').innerText.includes('visitor-notes.md')")
    _tab(page2, "4 · Compare")
    _fill(page2, "cmp-max", 12)
    page2.click("#cmp-generate")
    page2.wait_for_function("() => document.querySelector('#cmp-out-0 textarea').value.length > 40")
    other.close()

    # the first page's session never saw the visitor's upload
    _tab(page, "1 · Data")
    assert "Sources: pirate_recipes.txt (sample)" in page.inner_text("#data-stats")
    assert "visitor-notes" not in page.inner_text("#data-stats")

    # a reloaded page reattaches to the running job's chart
    page.reload()
    _tab(page, "2 · Train")
    page.wait_for_selector("#train-job .badge.running", timeout=60_000)  # the page's restore, then its first poll
    assert _wait_points(page, 35) > 35

    # stop keeps what was learned
    page.click("#train-stop")
    page.wait_for_selector("#train-job .badge.stopped", timeout=60_000)
    stopped = next(j for j in studio.runs.jobs() if j.name == "pirate-lora").snapshot()
    assert stopped["state"] == "stopped" and stopped["progress"]["step"] >= 35
    _shot(page, "2-train-stopped")

    # 3. Library: the adapter is listed; selecting it shows its settings and loss curve
    _tab(page, "3 · Library")
    page.wait_for_function("() => document.querySelector('#lib-table').innerText.includes('pirate-lora')")
    for _ in range(5):  # the table may redraw once after the tab opens (two adapters now): click until picked
        page.locator("#lib-table span.text").filter(has_text="pirate-lora").first.click()
        time.sleep(0.5)
        if _value(page, "lib-picked") == "pirate-lora":
            break
    page.wait_for_selector("#lib-details :text('mlp.c_fc')")
    assert page.evaluate("() => document.querySelector('#lib-curve .js-plotly-plot').data[0].x.length") >= 35
    _shot(page, "3-library")

    # 4. Compare: base and adapter side by side, streamed, same seed
    page.click("#lib-use")
    page.wait_for_selector("#cmp-adapters :text('pirate-lora')")
    _fill(page, "cmp-prompt", "Ahoy! Today in the galley we cook")
    _fill(page, "cmp-max", 48)
    page.click("#cmp-generate")
    page.wait_for_selector("#cmp-out-1 :text('Adapter · pirate-lora')")
    page.wait_for_function("() => ['#cmp-out-0', '#cmp-out-1'].every(s => "
                           "document.querySelector(s + ' textarea').value.length > 80)", timeout=60_000)
    page.wait_for_function("() => !document.querySelector('#cmp-out-1 .progress-text, #cmp-out-1 .eta-bar')",
                           timeout=60_000)
    base_text = page.locator("#cmp-out-0 textarea").input_value()
    lora_text = page.locator("#cmp-out-1 textarea").input_value()
    assert base_text.startswith("Ahoy! Today") and lora_text.startswith("Ahoy! Today") and base_text != lora_text
    _shot(page, "4-compare", readme="compare.png", full=True)

    # download the adapter as a PEFT .zip
    _tab(page, "3 · Library")
    page.click("#lib-download")
    link = page.locator("#lib-file a").first
    link.wait_for()
    with page.expect_download() as dl:
        link.click()
    target = ARTIFACTS / "pirate-lora.zip"
    dl.value.save_as(str(target))
    with zipfile.ZipFile(target) as zf:
        assert {"adapter_model.safetensors", "adapter_config.json", "studio.json"} <= set(zf.namelist())

    # ...and upload it again under a new name (validated by the core library)
    page.set_input_files("#lib-upload input[type=file]", str(target))
    _fill(page, "lib-upload-name", "pirate-copy")
    page.click("#lib-import")
    page.wait_for_selector("#lib-status :text('Imported')")
    page.wait_for_function("() => document.querySelector('#lib-table').innerText.includes('pirate-copy')")
    ctx.close()
