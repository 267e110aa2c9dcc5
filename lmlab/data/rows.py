"""Training rows as views of token stores: a row is a window of `seq_len` tokens of a flat token array.

Nothing is materialised: a row set is a list of store parts and an array of window
numbers, so a train/replay mix, a `data.unique_tokens` subset or a shuffle is a
new index array, never a copy of tokens. `position_ids` and `labels` are computed
per batch, vectorised, from the document starts, with the semantics of
`lmlab.data.packing`: positions restart at each document and at each row, the
first token of a document is not a target, and restarting positions give
intra-document attention in transformers.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from lmlab.data.packing import IGNORE_INDEX
from lmlab.data.store import StorePart


def window_columns(part: StorePart, windows: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """`input_ids`, `position_ids` and `labels` of the given windows of one part, shape (len(windows), seq_len)."""
    first = windows.astype(np.int64)[:, None] * seq_len
    t = first + np.arange(seq_len, dtype=np.int64)[None, :]
    ids = np.asarray(part.tokens[t], dtype=np.int64)
    doc = np.searchsorted(part.starts, t, side="right") - 1
    doc_start = part.starts[doc]
    positions = t - np.maximum(doc_start, first)
    labels = np.where(t == doc_start, IGNORE_INDEX, ids)
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


class PackedRows(torch.utils.data.Dataset):
    """Rows `index[i]` of the concatenated windows of `parts`; the HF Trainer reads it as a map-style dataset."""

    def __init__(self, parts: Sequence[StorePart], seq_len: int, index: np.ndarray | None = None):
        self.parts = list(parts)
        self.seq_len = seq_len
        counts = np.array([p.rows(seq_len) for p in self.parts], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.index = np.arange(self.offsets[-1], dtype=np.int64) if index is None else np.asarray(index, np.int64)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def column_names(self) -> list[str]:
        return ["input_ids", "position_ids", "labels"]

    def columns(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The rows at `indices`, as arrays of shape (len(indices), seq_len), in that order."""
        rows = self.index[np.asarray(indices, dtype=np.int64)]
        out = {k: np.empty((len(rows), self.seq_len), dtype=np.int64) for k in self.column_names}
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(part_of):
            where = np.nonzero(part_of == p)[0]
            cols = window_columns(self.parts[p], rows[where] - self.offsets[p], self.seq_len)
            for key, value in cols.items():
                out[key][where] = value
        return out

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """A whole batch at once (torch's DataLoader calls this when it exists): one vectorised lookup."""
        cols = {k: torch.from_numpy(v) for k, v in self.columns(indices).items()}
        return [{k: v[i] for k, v in cols.items()} for i in range(len(indices))]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.__getitems__([i % len(self)])[0]

    def __iter__(self):
        for start in range(0, len(self), 256):
            yield from self.__getitems__(range(start, min(start + 256, len(self))))

    def select(self, indices: Sequence[int] | np.ndarray) -> "PackedRows":
        return PackedRows(self.parts, self.seq_len, self.index[np.asarray(indices, dtype=np.int64)])

    def shuffle(self, seed: int) -> "PackedRows":
        return self.select(np.random.default_rng(seed).permutation(len(self)))

    def tokens(self) -> int:
        return len(self) * self.seq_len

    @staticmethod
    def concat(sets: Sequence["PackedRows"]) -> "PackedRows":
        """One row set over all parts of `sets`, in order, each keeping its own index."""
        parts, index, shift = [], [], 0
        for rows in sets:
            index.append(rows.index + shift)
            parts += rows.parts
            shift += int(rows.offsets[-1])
        return PackedRows(parts, sets[0].seq_len, np.concatenate(index) if index else np.zeros(0, np.int64))

    def to_dict(self) -> dict[str, Any]:
        """All rows as lists (tests and small validation sets)."""
        return {k: v.tolist() for k, v in self.columns(range(len(self))).items()}


class Numbered(torch.utils.data.Dataset):
    """`dataset` (packed rows or a datasets.Dataset) whose rows also carry their position as `row_id`: the key
    of a per-row cache (distillation's teacher top-k), read back in whatever order the sampler draws rows."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        rows = self.dataset.__getitems__(list(indices))
        return [{**row, "row_id": int(i)} for row, i in zip(rows, indices)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i % len(self)])[0]
