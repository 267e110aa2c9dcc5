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


def test_every_function_fits_on_one_screen():
    long = [(str(p.relative_to(PACKAGE)), f.name, f.end_lineno - f.lineno + 1) for p in PACKAGE.rglob("*.py")
            for f in _functions(p) if f.end_lineno - f.lineno + 1 > 60]
    assert long == []


def test_the_architecture_page_names_every_module():
    """docs/architecture.md is the map of the code: a module it does not name is missing from it."""
    import re

    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")
               and not re.search(rf"\b{re.escape(p.stem)}(\.py)?\b", page)]
    assert missing == []


def _trainer_train_calls(source: str) -> list[int]:
    """Lines that call a Trainer's `.train(...)`: on anything whose expression names a trainer (`trainer`,
    `job.trainer`, `self._trainer`, `Trainer`), or on `super()` inside a trainer class. A module's
    `model.train(False)` is not one."""
    lines = []
    for cls_or_fn in ast.walk(ast.parse(source)):
        trainer_class = isinstance(cls_or_fn, ast.ClassDef) and (
            "trainer" in cls_or_fn.name.lower() or any("trainer" in ast.unparse(b).lower() for b in cls_or_fn.bases))
        for node in ast.walk(cls_or_fn) if trainer_class or isinstance(cls_or_fn, ast.Module) else []:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "train"):
                continue
            target = ast.unparse(node.func.value)
            if "trainer" in target.lower() or (trainer_class and target == "super()"):
                lines.append(node.lineno)
    return sorted(set(lines))


def test_every_stage_trains_through_one_call_site():
    calls = [(str(p.relative_to(PACKAGE)), line) for p in PACKAGE.rglob("*.py")
             for line in _trainer_train_calls(p.read_text())]
    assert [path for path, _ in calls] == ["stages/loop.py"], calls
    planted = "def f(job):\n    job.trainer.train()\n\nclass T(Trainer):\n    def g(self):\n        super().train()\n" \
              "\ndef h(model):\n    model.train(False)\n"
    assert _trainer_train_calls(planted) == [2, 6]  # the check sees other spellings, and only trainers


def test_nothing_deletes_a_tree_outside_the_containment_helper():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "rmtree" in p.read_text() and p.name != "paths.py"]
    assert offenders == []


def test_the_project_cites_only_files_it_contains():
    """Rules are documented in docs/ (with the papers as sources); nothing points outside the repository."""
    texts = [p.read_text() for p in [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]]
    outside = ("RECIPES" + ".md", ".." + "/shared")  # spelled in pieces so this file does not cite them itself
    assert not any(name in text for text in texts for name in outside)


def test_every_lmlab_name_a_benchmark_or_script_imports_exists():
    """Benchmarks import lmlab inside their functions, so a moved name breaks them only when they run
    (pretrain_throughput.py imported validate_recipe from its old module for a while)."""
    import importlib

    missing = []
    for path in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "docs").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lmlab"):
                module = importlib.import_module(node.module)
                is_package = hasattr(module, "__path__")
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                            and not (is_package and importlib.util.find_spec(f"{node.module}.{a.name}"))]
    assert missing == []
