"""House rules of src/sashimi, read from the source with `ast`: no import cycle (imports inside
functions and under TYPE_CHECKING count), sample and evaluate do not import the trainer, files
of at most 600 lines, functions of at most 80, and a module docstring of at most 15 lines.
(No `torch.load` without weights_only=True: tests/test_safe_load.py.)"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from conftest import ROOT  # tests/ is on sys.path

PACKAGE = ROOT / "src" / "sashimi"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 80
MAX_MODULE_DOC_LINES = 15


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("sashimi", ..., name)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package: dotted name -> (file, parsed tree)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[_module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return out


def _imported(name: str, path: Path, tree: ast.Module, known: set[str]) -> Iterator[str]:
    """The package modules that module `name` imports anywhere in its file: for
    `from m import x` the submodule m.x if there is one, else m itself."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name
                while target and target not in known:  # `import a.b.c`: the deepest module
                    target = target.rpartition(".")[0]
                if target:
                    yield target
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the current package, `level - 1` packages up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    yield sub
                elif base in known:
                    yield base


@cache
def _import_graph() -> dict[str, frozenset[str]]:
    modules = _modules()
    known = set(modules)
    return {
        name: frozenset(t for t in _imported(name, path, tree, known) if t != name)
        for name, (path, tree) in modules.items()
    }


def _reachable(graph: dict[str, frozenset[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(graph[v])
    return seen


def _import_cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted."""
    reach = {v: _reachable(graph, v) for v in graph}
    cycles = {frozenset({v} | {w for w in reach[v] if v in reach[w]}) for v in graph}
    return sorted(sorted(c) for c in cycles if len(c) > 1)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    a = ast.parse("def f():\n    from sashimi.b import g\n")
    b = ast.parse("from . import a\nimport sashimi.c\n")
    known = {"sashimi.a", "sashimi.b", "sashimi.c"}
    graph = {
        "sashimi.a": frozenset(_imported("sashimi.a", PACKAGE / "a.py", a, known)),
        "sashimi.b": frozenset(_imported("sashimi.b", PACKAGE / "b.py", b, known)),
        "sashimi.c": frozenset(),
    }
    assert graph["sashimi.b"] == {"sashimi.a", "sashimi.c"}
    assert _import_cycles(graph) == [["sashimi.a", "sashimi.b"]]


def test_no_import_cycle():
    graph = _import_graph()
    assert "sashimi.models.sashimi" in graph and graph["sashimi.models.sashimi"]
    cycles = _import_cycles(graph)
    assert not cycles, "import cycles among sashimi modules: " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_sample_and_evaluate_do_not_import_the_trainer():
    graph = _import_graph()
    for name in ("sashimi.sample", "sashimi.evaluate"):
        assert name in graph, f"{name} is missing"
        assert "sashimi.train" not in graph[name], f"{name} imports sashimi.train"


def test_no_file_over_600_lines():
    long = []
    for path, _ in _modules().values():
        n = len(path.read_text().splitlines())
        if n > MAX_FILE_LINES:
            long.append(f"{_rel(path)} ({n})")
    assert not long, f"files over {MAX_FILE_LINES} lines: {', '.join(long)}"


def test_no_function_over_80_lines():
    long = []
    for path, tree in _modules().values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{_rel(path)}:{node.lineno} {node.name} ({n})")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_every_module_has_a_short_docstring():
    bad = []
    for path, tree in _modules().values():
        if ast.get_docstring(tree) is None:
            bad.append(f"{_rel(path)} (none)")
            continue
        doc = tree.body[0]  # the docstring's expression: count the lines it spans in the file
        n = doc.end_lineno - doc.lineno + 1
        if n > MAX_MODULE_DOC_LINES:
            bad.append(f"{_rel(path)} ({n} lines)")
    assert not bad, f"module docstrings missing or over {MAX_MODULE_DOC_LINES} lines: " + ", ".join(
        bad
    )
