"""Names and paths can never make lmlab write or delete outside its run directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from lmlab.paths import contained, remove_run_dir, remove_tree, safe_name


def lmlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", ".hidden", "a\\b", "", "x/../.."])
def test_a_recipe_name_that_is_not_an_identifier_is_refused_with_its_line(tmp_path, name):
    from lmlab.loading import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  hidden_size: 32\nname: {name!r}\n")
    with pytest.raises(LmlabError) as err:
        load_recipe(path)
    assert err.value.file == str(path) and err.value.line == 3 and err.value.field == "name"


@pytest.mark.parametrize("where", ["pipeline", "stage", "eval"])
def test_pipeline_and_stage_names_of_dot_dot_delete_nothing(tmp_path, where):
    """The issue's 7-line pipeline: it used to empty the working directory's parent."""
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "sibling.txt").write_text("a user's file")
    names = {"pipeline": "..", "stage": "pt", "eval": "eval", where: ".."}
    (project / "p.yaml").write_text(
        f"name: '{names['pipeline']}'\noutput: {{dir: .}}\nstages:\n"
        f"  - {{stage: pretrain, name: '{names['stage']}', train: {{max_steps: 1}}}}\n"
        f"  - {{stage: eval, name: '{names['eval']}'}}\n")
    before = snapshot(tmp_path)
    result = lmlab("run", "p.yaml", cwd=project)
    assert result.returncode == 2, result.stderr
    assert "p.yaml" in result.stderr and "name" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path) == before


def test_a_stage_command_with_a_bad_name_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "r.yaml").write_text("name: '..'\ntrain: {max_steps: 1}\n")
    before = snapshot(tmp_path)
    result = lmlab("pretrain", "r.yaml", "--overwrite", cwd=tmp_path)
    assert result.returncode == 2 and "r.yaml:1: name" in result.stderr
    assert snapshot(tmp_path) == before


def test_remove_tree_refuses_anything_not_strictly_inside_its_root(tmp_path):
    root = tmp_path / "runs"
    (root / "a").mkdir(parents=True)
    outside = tmp_path / "keep"
    outside.mkdir()
    for target in (root, tmp_path, outside, root / ".." / "keep", Path("/")):
        with pytest.raises(LmlabError, match="not inside"):
            remove_tree(target, root)
    link = root / "link"
    link.symlink_to(outside)  # a link inside the root that points out of it resolves outside: refused
    with pytest.raises(LmlabError, match="not inside"):
        remove_tree(link, root)
    assert outside.is_dir()
    remove_tree(root / "a", root)
    assert not (root / "a").exists()
    assert contained(root / "x" / "y", root) == (root / "x" / "y").resolve()


def test_overwrite_never_deletes_a_directory_lmlab_did_not_make(tmp_path):
    user_dir = tmp_path / "runs" / "notes"
    user_dir.mkdir(parents=True)
    (user_dir / "thesis.tex").write_text("years of work")
    with pytest.raises(LmlabError, match="not made by lmlab"):
        remove_run_dir(user_dir, tmp_path / "runs")
    assert (user_dir / "thesis.tex").is_file()
    (user_dir / "recipe.yaml").write_text("name: notes\n")  # a run directory: it may go
    remove_run_dir(user_dir, tmp_path / "runs")
    assert list(user_dir.iterdir()) == []  # emptied; the directory (and a held lock file) stays


def test_a_missing_local_data_path_is_an_error_not_a_hub_download(tmp_path):
    from lmlab.recipe import SourceSpec
    from lmlab.loading import load_recipe

    assert SourceSpec.model_validate("hub:org/data").kind == "hub"
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndata:\n  train: corpus.txt\n")
    with pytest.raises(LmlabError, match="file not found: corpus.txt") as err:
        load_recipe(path)
    assert err.value.line == 3 and err.value.field == "data.train.0"


def test_safe_name_turns_any_text_into_a_valid_name():
    import re

    from lmlab.paths import NAME_PATTERN

    for text in ("../../etc", "lr=0.001", "a b/c", "..", "."):
        assert re.match(NAME_PATTERN, safe_name(text))
