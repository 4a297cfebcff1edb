"""`make test` never builds or imports the llama.cpp peer (a source build of minutes): only `make bench`
does. And the bench's own modules import each other without a cycle.

Only the standard library here: `bench/` is read as text, never imported."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_test_module_imports_bench_or_llama_cpp():
    for path in sorted(ROOT.glob("tests/**/*.py")):
        bad = {name for name in _imports(path) if name == "bench" or name.startswith(("bench.", "llama_cpp"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def bench_sources(pattern: str = "*.py") -> list[Path]:
    """The bench's own files (not what a run builds under bench/out, such as llama.cpp's tree)."""
    out = ROOT / "bench" / "out"
    return sorted(p for p in (ROOT / "bench").rglob(pattern) if not p.is_relative_to(out))


def test_pytest_collects_only_tests_and_make_test_runs_no_bench():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^testpaths = \["tests"\]$', pyproject, re.M)
    assert not bench_sources("test_*.py") and not bench_sources("*_test.py")
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test: .*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "bench" not in recipe.group(1)


def test_bench_loads_llama_cpp_only_inside_the_edge_scenarios():
    """The bench's entry point may import the edge part, but `llama_cpp` (the Python bindings, built
    from source) is imported only in functions that run the peer."""
    paths = bench_sources()
    assert len(paths) > 20  # the subpackages were searched, not just bench/ itself
    for path in paths:
        top = {name for node in ast.parse(path.read_text()).body if isinstance(node, ast.Import | ast.ImportFrom)
               for name in _imports_of(node)}
        assert not any(name.startswith("llama_cpp") for name in top), \
            f"{path.relative_to(ROOT)} imports llama_cpp at top level"


def _bench_modules() -> dict[str, Path]:
    """Dotted name -> file of every module and package in bench/."""
    modules = {}
    for path in bench_sources():
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def bench_import_graph() -> dict[str, set[str]]:
    """Which bench modules each bench module imports, anywhere in its body (a function-level import
    still makes a cycle once both functions run). `from bench.x import y` is an edge to `bench.x.y` when
    that is a module, else to `bench.x`."""
    modules = _bench_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            edges |= {target for target in targets if target in modules and target != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_bench_modules_import_each_other_without_a_cycle():
    """A cycle makes what a module needs depend on which one was imported first (the report and its
    edge part once imported each other); the bench's layers import downwards only."""
    graph = bench_import_graph()
    assert "bench.run" in graph and graph["bench.run"], "the graph found no imports: the parser is broken"
    assert find_cycle(graph) is None, f"import cycle in bench/: {' -> '.join(find_cycle(graph) or [])}"


def _imports_of(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module or ""]
