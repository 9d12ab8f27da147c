"""The package's shape holds: each folder imports only the core and the folders before it
(data -> models -> train -> infer -> analysis -> sweep -> serve, cli), and no source file or function grows
past the sizes docs/architecture.md promises."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mnistlab"
ORDER = ["core", "data", "models", "train", "infer", "analysis", "sweep", "serve", "cli"]
EXEMPT = {"__init__", "__main__"}  # the lazy public API and `python -m mnistlab` sit above everything


def _layer(module: str) -> str:
    """The layer of a dotted module under mnistlab ("data.splits" -> "data", "config" -> "core")."""
    head = module.split(".")[0]
    return head if head in ORDER else "core"


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every mnistlab module `path` imports, anywhere in the file (lazy imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnistlab."):
            found.append((node.lineno, node.module.removeprefix("mnistlab.")))
        elif isinstance(node, ast.ImportFrom) and node.module == "mnistlab":
            found += [(node.lineno, alias.name) for alias in node.names if alias.name != "__version__"]
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, a.name.removeprefix("mnistlab.")) for a in node.names if a.name.startswith("mnistlab.")
            ]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_runs_back_up(path: Path) -> None:
    own = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
    if own in EXEMPT:
        return
    rank = ORDER.index(_layer(own))
    upward = [f"line {line}: {target}" for line, target in _imports(path) if ORDER.index(_layer(target)) > rank]
    # serve and cli are both faces: cli starts serve, serve never reaches back into cli
    upward += [
        f"line {line}: {target}"
        for line, target in _imports(path)
        if _layer(own) == "serve" and _layer(target) == "cli"
    ]
    assert not upward, f"{own} ({_layer(own)}) imports from a later layer: {upward}"


def test_the_rule_sees_an_upward_import(tmp_path: Path) -> None:
    source = tmp_path / "splits.py"
    source.write_text("def f():\n    from mnistlab.train.loop import train\n")
    assert _imports(source) == [(2, "train.loop")] and ORDER.index(_layer("train.loop")) > ORDER.index("data")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_small(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 800, f"{path.name}: over 800 lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, f"{path.name}: functions over 80 lines: {long}"
