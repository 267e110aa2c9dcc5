"""The embedded `general` corpus: the Python standard library's source and docstrings.

Every machine with Python has it, it is human-written (prose in docstrings and
comments, code in between), and it needs no download. Files are read in sorted
order and cut into documents at top-level `def` / `class` boundaries, grouped to
about 1-4 KB, so the corpus and its document ids are the same on every run of the
same Python version.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path
from typing import Iterator

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo",
             "ensurepip", "venv"}
TARGET_CHARS = 1024  # start a new document once the current one is at least this long...
MAX_CHARS = 4096  # ...and cut a single block that is longer than this


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files in a fixed order, without tests and vendored tools.

    A walk that never enters the skipped directories: globbing the whole tree (site-packages and the test
    suites included) took about 0.5 s of every run that reads the corpus."""
    root = root or stdlib_root()
    return list(_stdlib_files(str(root)))


@functools.lru_cache(maxsize=4)
def _stdlib_files(root: str) -> tuple[Path, ...]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [Path(folder, name) for name in names if name.endswith(".py") and not name.startswith("test_")]
    return tuple(sorted(files, key=lambda p: p.relative_to(root).as_posix()))


def _top_level_blocks(text: str) -> list[str]:
    """Split source at lines that start a top-level def, class or decorator."""
    blocks, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith(("def ", "class ", "async def ", "@")) and current and not current[-1].startswith("@"):
            blocks.append("".join(current))
            current = []
        current.append(line)
    if current:
        blocks.append("".join(current))
    return blocks


def _split_long(block: str) -> list[str]:
    """Cut an oversized block at line boundaries into pieces of at most MAX_CHARS."""
    pieces, current, size = [], [], 0
    for line in block.splitlines(keepends=True):
        if size + len(line) > MAX_CHARS and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return pieces


def file_documents(text: str) -> list[str]:
    """Group a file's top-level blocks into documents of roughly TARGET_CHARS..MAX_CHARS characters."""
    docs, current = [], ""
    for block in _top_level_blocks(text):
        for piece in _split_long(block):
            if current and (len(current) >= TARGET_CHARS or len(current) + len(piece) > MAX_CHARS):
                docs.append(current)
                current = ""
            current += piece
    if current.strip():
        docs.append(current)
    return [d for d in docs if d.strip()]


def general_documents(limit: int | None = None) -> Iterator[tuple[str, str]]:
    """`(doc_id, text)` pairs such as `("email/message.py#3", "...")`, deterministic in order and id."""
    root = stdlib_root()
    count = 0
    for path in stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rel = path.relative_to(root).as_posix()
        for i, doc in enumerate(file_documents(text)):
            yield f"{rel}#{i}", doc
            count += 1
            if limit is not None and count >= limit:
                return
