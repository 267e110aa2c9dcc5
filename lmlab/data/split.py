"""The one hash split: which documents, chats, pairs and prompts are held out.

Every held-out set in lmlab is chosen by a stable hash of an item's id, never by
position, so it does not move when data is reordered, streamed, subset or
resharded across ranks, and evaluation never sees an item training saw.
"""

from __future__ import annotations

import hashlib

GENERAL_HELD_OUT = 0.01  # the general corpus's validation share: held-out text for bits per byte and cloze


def doc_hash(doc_id: str) -> float:
    """A stable number in [0, 1) from an id (blake2b, independent of PYTHONHASHSEED)."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


def is_held_out(doc_id: str, fraction: float) -> bool:
    return doc_hash(doc_id) < fraction


def held_out_indices(hashes, fraction: float):
    """Indices (into `hashes`, an array of `doc_hash` values) held out: those below `fraction`, and at
    least the lowest one when a fraction is asked for: the one rule, for lists, tables and datasets."""
    import numpy as np

    hashes = np.asarray(hashes)
    if not fraction or not len(hashes):
        return np.arange(0)
    held = np.flatnonzero(hashes < fraction)
    if not len(held) and len(hashes) > 1:
        held = np.asarray([int(np.argmin(hashes))])
    return held


def held_out_general_texts(n: int | None = None) -> list[str]:
    """The general corpus's held-out documents (the 1% that pretraining validates on and never trains on)."""
    from lmlab.data.general import general_documents

    texts = [text for doc_id, text in general_documents() if is_held_out(doc_id, GENERAL_HELD_OUT)]
    return texts[:n] if n is not None else texts
