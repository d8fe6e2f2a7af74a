"""Issue 27's size rules, read from the source: functions in core/ at most 80 lines, the studio's
create_*_tab builders at most 130, so each reads in one sitting."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def functions(package: str):
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(ROOT)}:{node.name}", node.end_lineno - node.lineno + 1


def test_core_functions_are_at_most_80_lines():
    long = {name: n for name, n in functions("core") if n > 80}
    assert long == {}


def test_tab_builders_are_at_most_130_lines():
    builders = {name: n for name, n in functions("studio") if name.split(":")[1].startswith("create_")}
    assert len(builders) >= 7  # every tab has one
    assert {name: n for name, n in builders.items() if n > 130} == {}
