"""Pack tokenised documents into fixed-length rows with intra-document attention.

Each document ends with EOS and rows are cut at exactly `seq_len` tokens, so no
compute is spent on padding. Position ids restart at 0 at every document start;
transformers turns restarting position ids (with no attention mask) into a
block-diagonal causal mask, so a token never attends to another document in the
same row, with sdpa, eager and flash attention alike. The first token of each
document is not a training target: predicting it from the previous document's
EOS would teach the model to guess across unrelated texts.
"""

from __future__ import annotations

from typing import Iterable, Iterator

IGNORE_INDEX = -100  # the label transformers' loss skips


def pack_token_lists(docs: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[dict[str, list[int]]]:
    """Rows of `input_ids`, `position_ids` and `labels`, each exactly `seq_len` long.

    A document that does not fit continues in the next row (at position 0 there,
    since a row is processed alone). The incomplete tail is dropped.
    """
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for doc in docs:
        tokens = list(doc) + [eos_id]
        for i, tok in enumerate(tokens):
            if len(ids) == seq_len:
                yield {"input_ids": ids, "position_ids": pos, "labels": labels}
                ids, pos, labels = [], [], []
            start = not pos or i == 0
            pos.append(0 if start else pos[-1] + 1)
            ids.append(tok)
            labels.append(IGNORE_INDEX if i == 0 else tok)
    if len(ids) == seq_len:
        yield {"input_ids": ids, "position_ids": pos, "labels": labels}


def join_with_eos(ids: list[list[int]], eos: int, dtype=None):
    """Documents' token ids joined into one array, each followed by EOS, and each one's length (EOS
    included): how every packed stream lmlab builds (the token store, streamed rows) separates documents."""
    import numpy as np

    flat: list[int] = []
    for doc in ids:
        flat += doc
        flat.append(eos)
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    return np.asarray(flat, dtype=dtype or np.int64), lengths

