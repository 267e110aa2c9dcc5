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


def chat_fingerprint(tokenizer) -> str:
    """What fixes a rendered chat's tokens: the tokenizer and its chat template (which tokenizer_hash omits)."""
    from lmlab.data.store import tokenizer_hash

    return records_fingerprint(tokenizer_hash(tokenizer), tokenizer.chat_template)


def cached_records(rows: Callable[[], Iterator[dict[str, Any]]], fingerprint: str, features=None):
    """A disk-backed `datasets.Dataset` of `rows()`, written once for this fingerprint; None if no rows.
    `features` fixes the schema where rows differ in shape (chat messages with and without tool calls)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    def generate(fingerprint: str):  # the argument keys datasets' own cache; rows come from the closure
        yield from rows()

    datasets.disable_progress_bars()  # lmlab's own status line says what is happening
    try:
        return datasets.Dataset.from_generator(generate, gen_kwargs={"fingerprint": fingerprint}, features=features,
                                               fingerprint=fingerprint, cache_dir=str(cache_dir() / "datasets"))
    except DatasetGenerationError as exc:  # a bad record: the error lmlab raised while reading it
        if type(exc.__cause__).__name__ == "SchemaInferenceError":  # no rows at all
            return None
        cause = exc.__cause__ or exc.__context__
        while cause is not None and not isinstance(cause, LmlabError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise cause from None


def cached_map(dataset, function: Callable, fingerprint: str, **kwargs):
    """`dataset.map` under a fixed fingerprint, so the result file is found again by the next run."""
    return dataset.map(function, batched=True, new_fingerprint=fingerprint, **kwargs)


def _kind(value: Any) -> str | None:
    if value is None:
        return None
    return {bool: "a boolean", int: "a number", float: "a number", str: "text", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def uniform_rows(located: Iterator[tuple[str, int, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The rows of `(file, line, row)`, checked to keep one type per field (a table column has one).

    An answer that is a number in one record and text in the next, or a pair whose chosen side is
    text here and a message list there, is named at the record that differs, before anything is written.
    """
    first: dict[str, tuple[str, str, int]] = {}
    for where, line, row in located:
        for name, value in row.items():
            kind = _kind(value)
            if kind is None:
                continue
            seen = first.setdefault(name, (kind, where, line))
            if seen[0] != kind:
                raise LmlabError(f"'{name}' is {kind} here but {seen[0]} at {seen[1]}:{seen[2]}; every record "
                                 "needs the same type", file=where, line=line, field=name)
        yield row
