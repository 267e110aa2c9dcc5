"""Where lmlab may write and delete: names are identifiers, and every removal stays inside its root.

A recipe name or stage name becomes a directory that `--overwrite` and pipeline
reruns delete. A name like `..` once made that the user's working directory's
parent, so names are checked by one pattern, and every `rmtree` in lmlab goes
through `remove_tree`, which resolves both paths and refuses anything that is
not strictly inside the root it is given. JSON and text that lmlab writes are
written to a temporary sibling and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # an identifier: no separators, no leading dot, never `..`
RUN_MARKERS = ("recipe.yaml", "pipeline.json", "lmlab.json", "study.json")  # files that say "lmlab wrote this"


def safe_name(text: str) -> str:
    """Any text (an ablation value, a model path) squeezed into a valid name."""
    squeezed = re.sub(r"[^A-Za-z0-9_.-]", "_", str(text)).lstrip(".") or "_"
    return squeezed


def contained(path: str | Path, root: str | Path) -> Path:
    """`path` resolved, after checking it lies strictly inside `root` (never `root` itself)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved == base or base not in resolved.parents:
        raise LmlabError(f"refusing to touch {resolved}: it is not inside {base}", file=str(path),
                         hint="names must be plain identifiers; check `name` and `output.dir`")
    return resolved


def remove_tree(path: str | Path, root: str | Path, missing_ok: bool = True) -> None:
    """Delete a directory tree that must lie inside `root`; the one place lmlab deletes trees."""
    target = contained(path, root)
    if not target.exists():
        if not missing_ok:
            raise LmlabError("nothing to remove", file=str(path))
        return
    if target.is_symlink() or not target.is_dir():
        target.unlink()
        return
    shutil.rmtree(target)


def remove_run_dir(run_dir: str | Path, root: str | Path) -> None:
    """Delete a previous run, but only a directory lmlab made: never a user's folder that shares the name."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not any((run_dir / m).exists() for m in RUN_MARKERS):
        raise LmlabError("this directory was not made by lmlab, so it is not deleted", file=str(run_dir),
                         hint="choose another `name` or `output.dir`")
    remove_tree(run_dir, root)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a whole file or nothing: a temporary sibling, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, payload: Any) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str))
