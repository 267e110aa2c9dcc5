"""Post-training records (chats) as `datasets` tables on disk, built once per content and reused.

A million-example SFT set must neither sit in RAM as Python lists nor be checked and
measured again on every resume. The records are written by `Dataset.from_generator`
into lmlab's cache (`$LMLAB_CACHE/datasets`) under a fingerprint made of the content
hash of every source file and the settings that change the records, and every later
step (lengths, the held-out flag) is a `map` with its own fixed fingerprint, so a
second run memory-maps the cached tables and computes nothing. The trainer's own
tokenising `map` then runs on a disk-backed table and is cached by `datasets` too.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterator

from lmlab.data.cache import cache_dir
from lmlab.errors import LmlabError


def records_fingerprint(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def cached_records(rows: Callable[[], Iterator[dict[str, Any]]], fingerprint: str):
    """A disk-backed `datasets.Dataset` of `rows()`, written once for this fingerprint."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    def generate(fingerprint: str):  # the argument keys datasets' own cache; rows come from the closure
        yield from rows()

    datasets.disable_progress_bars()  # lmlab's own status line says what is happening
    try:
        return datasets.Dataset.from_generator(generate, gen_kwargs={"fingerprint": fingerprint},
                                               fingerprint=fingerprint, cache_dir=str(cache_dir() / "datasets"))
    except DatasetGenerationError as exc:  # a bad record: the error lmlab raised while reading it
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, LmlabError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def cached_map(dataset, function: Callable, fingerprint: str, **kwargs):
    """`dataset.map` under a fixed fingerprint, so the result file is found again by the next run."""
    return dataset.map(function, batched=True, new_fingerprint=fingerprint, **kwargs)
