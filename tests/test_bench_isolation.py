"""`make test` never builds or imports the llama.cpp peer: only `make bench` does (issue 12)."""

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


def test_pytest_collects_only_tests_and_make_test_runs_no_bench():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^testpaths = \["tests"\]$', pyproject, re.M)
    assert not list((ROOT / "bench").glob("test_*.py")) and not list((ROOT / "bench").glob("*_test.py"))
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test: .*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe and "bench" not in recipe.group(1)


def test_bench_loads_llama_cpp_only_inside_the_edge_scenarios():
    """The bench's entry point may import the edge part, but `llama_cpp` (the Python bindings, built
    from source) is imported only in functions that run the peer."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        top = {name for node in ast.parse(path.read_text()).body if isinstance(node, ast.Import | ast.ImportFrom)
               for name in _imports_of(node)}
        assert not any(name.startswith("llama_cpp") for name in top), f"{path.name} imports llama_cpp at top level"


def _imports_of(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return [node.module or ""]
