"""The one cache directory lmlab keeps between runs, and the content hashes that key what is in it.

Token stores are keyed by the content of the files they were built from, so a
second run, a resume, every sweep point and every rank find the same store, and
an edited file builds a new one. Hashing a 3 GB corpus on every run would cost
seconds, so each file's hash is remembered next to its size, modification time
and inode (git's index does the same) and recomputed only when one of them changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CACHE_ENV = "LMLAB_CACHE"
HASH_BLOCK = 1 << 22


def cache_dir() -> Path:
    """`$LMLAB_CACHE`, else `$XDG_CACHE_HOME/lmlab`, else `~/.cache/lmlab`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lmlab"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _memo_path() -> Path:
    return cache_dir() / "file_hashes.json"


def _read_memo() -> dict[str, list[str]]:
    try:
        return json.loads(_memo_path().read_text())
    except (OSError, ValueError):
        return {}


def file_hash(path: str | Path) -> str:
    """blake2b of a file's bytes, remembered while its size, mtime and inode stay the same."""
    path = Path(path).resolve()
    stat_key = _stat_key(path)
    memo = _read_memo()
    known = memo.get(str(path))
    if known and known[0] == stat_key:
        return known[1]
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    value = digest.hexdigest()
    if _stat_key(path) == stat_key:  # not modified while it was read
        _remember(str(path), [stat_key, value])
    return value


def _remember(key: str, value: list[str]) -> None:
    try:
        with locked(cache_dir() / "file_hashes.lock"):
            memo = _read_memo()
            memo[key] = value
            tmp = _memo_path().with_name(f".file_hashes.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, _memo_path())
    except OSError:
        pass  # a read-only cache only costs the hash next time


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a file, held across processes (two runs building the same store take turns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
