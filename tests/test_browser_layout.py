"""The studio fits a laptop screen (1280x720): the Train tab's Start, Stop and Resume are in view
without scrolling, and the tables' headers are not broken mid-word; a first upload of the wrong kind is
explained in one sentence. Playwright + Debian's chromium."""
from __future__ import annotations

import pytest

from test_browser import ARTIFACTS, _tab, browser, sync_api  # noqa: F401  (the browser fixture)
from core.model.config import TARGET_MODULES
from studio_helpers import _prepare, _train
from studio_server import served_studio

LAPTOP = {"width": 1280, "height": 720}
HEADERS_CUT_JS = """(sel) => [...document.querySelectorAll(sel + ' thead th')]
  .filter(th => th.offsetParent !== null)
  .filter(th => { const t = th.querySelector('.header-content, span') || th;
                  const words = t.innerText.trim().split(/\\s+/).length;
                  const line = parseFloat(getComputedStyle(t).lineHeight) || 16;
                  const lines = Math.round(t.getBoundingClientRect().height / line);
                  return th.scrollWidth > th.clientWidth + 1 || (words === 1 && lines > 1); })
  .map(th => th.innerText.trim())"""
OVERFLOWS_JS = """(sel) => { const v = document.querySelector(sel + ' .virtual-table-viewport') ||
  document.querySelector(sel + ' table').parentElement; return v.scrollWidth > v.clientWidth + 1; }"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    def one_adapter(studio):  # a row as wide as a real one: an automatic name, every target module
        _prepare(studio, "pirate_recipes_from_the_galley")
        _train(studio, "pirate_recipes_from_the_galley-gpt2-1207-051233", steps=2,
               dataset="pirate_recipes_from_the_galley", targets=list(TARGET_MODULES))
    with served_studio(tmp_path_factory.mktemp("studio"), before_build=one_adapter) as (url, studio):
        yield url, studio


@pytest.fixture
def page(server, browser):
    ctx = browser.new_context(viewport=LAPTOP)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.goto(server[0])
    yield page
    ctx.close()


def _in_view(page, elem_id: str) -> bool:
    box = page.locator(f"#{elem_id}").bounding_box()
    return (box is not None and box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= LAPTOP["width"]
            and box["y"] + box["height"] <= LAPTOP["height"])


def test_train_actions_are_in_view_at_1280x720(page):
    _tab(page, "2 · Train")
    page.wait_for_selector("#train-start")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "train-1280x720.png"))
    assert page.evaluate("() => window.scrollY") == 0
    assert [b for b in ("train-start", "train-stop", "train-resume") if not _in_view(page, b)] == []


def test_library_headers_are_not_broken_mid_word(page):
    _tab(page, "3 · Library")
    page.wait_for_function("() => document.querySelector('#lib-table').innerText.includes('pirate_recipes')")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "library-1280x720.png"))
    assert page.evaluate(HEADERS_CUT_JS, "#lib-table") == []
    assert not page.evaluate(OVERFLOWS_JS, "#lib-table")  # every column in view, no sideways scrolling


def test_jobs_table_headers_are_not_broken_mid_word(page):
    _tab(page, "2 · Train")
    page.wait_for_function("() => document.querySelector('#train-jobs').innerText.includes('pirate_recipes')")
    assert page.evaluate(HEADERS_CUT_JS, "#train-jobs") == []
    assert not page.evaluate(OVERFLOWS_JS, "#train-jobs")


def test_a_pdf_upload_gets_one_sentence_not_an_error_box(page, tmp_path):
    pdf = tmp_path / "notes.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    page.set_input_files("#data-files input[type=file]", str(pdf))
    page.wait_for_selector(":text('notes.pdf is not a text file')")
    assert "Error" not in page.inner_text("#data-files")
