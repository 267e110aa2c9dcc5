"""The shape of the code, checked: layers import downward only, no cycles, small stage runners."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "lmlab"


def test_the_import_linter_contracts_hold():
    """pyproject.toml's layers (cli -> experiments -> pipeline -> stages -> ... -> errors) and stage independence."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_no_import_cycles_counting_imports_inside_functions():
    import grimp

    graph = grimp.build_graph("lmlab")
    cycles = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
              if a != b and graph.chain_exists(importer=b, imported=a)]
    assert cycles == []


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_stage_functions_fit_on_one_screen():
    long = [(p.name, f.name, f.end_lineno - f.lineno + 1) for p in (PACKAGE / "stages").glob("*.py")
            for f in _functions(p) if f.end_lineno - f.lineno + 1 > 60]
    assert long == []


def test_every_stage_trains_through_one_call_site():
    calls = [(p.relative_to(PACKAGE), node.lineno) for p in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(p.read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "train"
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "trainer"]
    assert [str(path) for path, _ in calls] == ["stages/common.py"]


def test_nothing_deletes_a_tree_outside_the_containment_helper():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "rmtree" in p.read_text() and p.name != "paths.py"]
    assert offenders == []


def test_the_project_cites_only_files_it_contains():
    """Rules are documented in docs/ (with the papers as sources); nothing points outside the repository."""
    texts = [p.read_text() for p in [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]]
    outside = ("RECIPES" + ".md", ".." + "/shared")  # spelled in pieces so this file does not cite them itself
    assert not any(name in text for text in texts for name in outside)
