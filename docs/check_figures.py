"""Check that no figure of an older README was lost when its text moved into README.md and docs/*.md.

    python docs/check_figures.py [REV]      (default REV: 90db670, the README before the manual rewrite)

Every number in the old README, with the unit written right after it (x, %, ms, s, GiB, MB, tok/s, ...),
must appear in the new README.md or a docs/*.md file. Prints the figures not found and exits 1 if any.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = r"(?:\s?(?:x|%|ms|us|s|GiB|MiB|GB|MB|KB|K|TFLOP/s|tok/s|tokens/s|new tok/s|answers/s|/s|steps|tokens|bytes))?"
NUM = r"\d[\d,]*(?:\.\d+)*(?:e[-+]?\d+)?"
NUMBER = re.compile(r"(?<![\w.])(?:"
                    r"\d{4}-\d\d-\d\d(?: \d\d:\d\d(?: UTC)?)?"  # dates, with their time
                    r"|\d\d:\d\d"  # times of day
                    rf"|[-+]?{NUM}(?:-{NUM})?{UNITS}"  # a number or a range a-b, with its unit
                    r")(?![\w])")


def figures(text: str) -> list[str]:
    seen, out = set(), []
    for m in NUMBER.finditer(re.sub(r"\s+", " ", text)):
        tok = m.group(0).strip().rstrip(",")
        if tok not in seen:
            seen.add(tok)
            out.append(tok)
    return out


def main(rev: str = "90db670") -> int:
    old = subprocess.run(["git", "show", f"{rev}:README.md"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    new = "\n".join(p.read_text("utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    flat = re.sub(r"\s+", " ", new)  # a figure and its unit may now sit on two lines
    wanted = figures(old)
    missing = [f for f in wanted if f not in new and f not in flat]
    print(f"{len(wanted)} distinct figures in README.md at {rev}; {len(wanted) - len(missing)} found in "
          f"README.md + docs/*.md; {len(missing)} missing")
    for f in missing:
        print("  missing:", f)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
