"""The README is a manual: short, with the commands CI runs, and links into docs/ that resolve."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 350
# what .ci/run executes, in the README's words: set up, then test
CI_COMMANDS = ["pip install -r requirements.txt", "python app.py",
               "pip install -r requirements-dev.txt", "python -m pytest -q tests"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks(text: str) -> list[list[str]]:
    """The lines of each fenced code block."""
    return [b.strip("\n").splitlines() for b in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]


def _local_links(path: Path) -> list[str]:
    """Links to files of this repository (and anchors within the page), not to web addresses."""
    return [t for t in LINK.findall(path.read_text("utf-8")) if not re.match(r"[a-z]+:", t)]


def test_the_readme_is_at_most_350_lines():
    lines = README.read_text("utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_keeps_the_spaces_header():
    head = README.read_text("utf-8").split("---")[1]
    for key in ("sdk: gradio", "app_file: app.py", "sdk_version:"):
        assert key in head


def test_the_readme_shows_the_commands_ci_runs_as_its_own_code_lines():
    blocks = _blocks(README.read_text("utf-8"))
    assert ["pip install -r requirements.txt", "python app.py"] in blocks
    assert ["pip install -r requirements-dev.txt", "python -m pytest -q tests"] in blocks
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    for command in CI_COMMANDS:
        assert command in ci, f".ci/run no longer runs {command!r}: the README and CI disagree"


def test_every_local_link_in_the_readme_and_docs_resolves():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    docs_links = [t for t in _local_links(README) if t.startswith("docs/")]
    assert docs_links, "the README links into docs/"
    for page in pages:
        for target in _local_links(page):
            path = (page.parent / target.split("#")[0]).resolve()  # '#x' alone: the page itself
            assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_every_anchor_in_a_docs_link_names_a_heading():
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in _local_links(page):
            file, _, anchor = target.partition("#")
            if not anchor or file and not file.endswith(".md"):
                continue
            text = (page.parent / file if file else page).read_text("utf-8")
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
            assert anchor in slugs, f"{page.relative_to(ROOT)} links to {target}: no such heading"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")
