"""Where lmlab may write and delete: names are identifiers, and every removal stays inside its root.

A recipe name or stage name becomes a directory that `--overwrite` and pipeline
reruns delete. A name like `..` once made that the user's working directory's
parent, so names are checked by one pattern, and every `rmtree` in lmlab goes
through `remove_tree`, which resolves both paths and refuses anything that is
not strictly inside the root it is given. JSON and text that lmlab writes are
written to a temporary sibling and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lmlab.distributed import main_first
from lmlab.errors import LmlabError

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"  # an identifier: no separators, no leading dot, never `..`
LOCK = ".lock"
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
    """Delete a previous run, but only a directory lmlab made: never a user's folder that shares the name.

    The run's lock file stays (the caller may hold it), so a second process never sees the directory unlocked.
    """
    run_dir = Path(run_dir)
    contents = [p for p in run_dir.iterdir() if p.name != LOCK] if run_dir.is_dir() else []
    if contents and not any((run_dir / m).exists() for m in RUN_MARKERS):
        raise LmlabError("this directory was not made by lmlab, so it is not deleted", file=str(run_dir),
                         hint="choose another `name` or `output.dir`")
    contained(run_dir, root)
    for path in contents:
        remove_tree(path, run_dir)


def fsync_tree(path: Path) -> None:
    """Every file under `path` on disk before it is renamed into place (a checkpoint, an artifact)."""
    for file in Path(path).rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


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


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One job per run directory: a second `lmlab run` or stage command on it fails at once instead of
    interleaving its checkpoints and metrics with the first.

    Under several processes the job is all its ranks: rank 0 holds the lock, the others wait for
    it at a barrier (and fail with it). The file is opened without truncation, so a refused second
    process never erases the holder's PID.
    """
    handle = None
    with main_first() as main:  # a refusal on rank 0 is raised on every rank
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = open(run_dir / LOCK, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                raise LmlabError(f"another lmlab process (PID {holder}) is running in this directory",
                                 file=str(run_dir), hint="wait for it, or stop it first") from None
    try:
        if handle is not None:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        yield
    finally:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
