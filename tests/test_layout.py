"""The package layout's rules (README "Layout"), read from the source with ``ast``: imports point down
only, no import circles (function-local imports included), the CLI wing is imported by nothing in the
library, the two wings never import each other, and every module stays short enough to hold in one's
head."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cdrl"
MAX_LINES = 600
WINGS = ("cdrl.training", "cdrl.evaluation", "cdrl.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The cdrl modules ``name`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *filter(None, [node.module])])
            # "from cdrl import models" names a module; "from cdrl.x import f" names module cdrl.x
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target != "cdrl":
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def wing(name: str) -> str | None:
    return next((w for w in WINGS if name == w or name.startswith(w + ".")), None)


def test_the_layout_has_its_wings():
    for package in WINGS:
        assert package in MODULES, f"{package} is missing"


def test_no_import_circles_including_function_local_imports():
    # A package's __init__ may re-export its own modules; a module importing its own package's
    # __init__ is the circle to avoid, so edges into a parent package's __init__ count as well.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_nothing_in_the_library_imports_the_cli():
    offenders = {
        name: sorted(t for t in targets if wing(t) == "cdrl.cli")
        for name, targets in GRAPH.items()
        if wing(name) != "cdrl.cli"
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_wings_never_import_each_other_and_the_core_imports_no_wing():
    problems = []
    for name, targets in GRAPH.items():
        own = wing(name)
        for target in targets:
            other = wing(target)
            if other is None or other == own or own == "cdrl.cli":
                continue
            problems.append(f"{name} imports {target}")
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name]} has {lines} lines (at most {MAX_LINES})"
