"""The layers import downwards only: no import circle among core's and studio's modules (a circle means two
modules that cannot be read, tested or moved apart), and core never imports the UI's packages."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_PACKAGES = {"gradio", "plotly", "studio"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(the project modules `path` imports, at any depth of the file; the top-level packages it imports)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found, tops = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            tops.add(t.split(".")[0])
            if t in modules and t != name:
                found.add(t)
    return found, tops


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = [p for d in ("core", "studio") for p in (ROOT / d).rglob("*.py")]
    modules = {module_name(p) for p in files}
    edges, tops = {}, {}
    for p in files:
        edges[module_name(p)], tops[module_name(p)] = imports_of(p, modules)
    return edges, tops


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_core_and_studio_have_no_import_circle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_core_never_imports_the_ui():
    _, tops = graph()
    assert {m: sorted(t & UI_PACKAGES) for m, t in tops.items() if m.startswith("core") and t & UI_PACKAGES} == {}


MAX_CORE_MODULES_IN_STUDIO = 4  # core.api, and at most three more: the studio is a client of one public API


def core_modules_the_studio_imports() -> set[str]:
    files = [p for d in ("core", "studio") for p in (ROOT / d).rglob("*.py")]
    modules = {module_name(p) for p in files}
    clients = [p for p in (ROOT / "studio").rglob("*.py")] + [ROOT / "app.py"]
    return {m for p in clients for m in imports_of(p, modules)[0] if m == "core" or m.startswith("core.")}


def test_the_studio_reaches_core_through_its_public_api():
    used = core_modules_the_studio_imports()
    assert "core.api" in used
    assert len(used) <= MAX_CORE_MODULES_IN_STUDIO, sorted(used)


def test_the_public_api_loads_no_ui_package():
    """Not only core/api.py's own lines: nothing it imports, at any depth, loads gradio, plotly or the studio."""
    code = "import sys, core.api; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (UI_PACKAGES,)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
