"""From a recipe's data block to packed train and validation datasets.

Sources are loaded, mixed by weight, split train/validation by a stable hash of
each document's id (so the split is the same streamed or not, in any order),
shuffled by seed, tokenised and packed. Map-style datasets are cached by
`datasets`, so a second run or a resume does not tokenise again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmlab.data.packing import pack_batch
from lmlab.errors import LmlabError
from lmlab.recipe import DataConfig, SourceSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PackedData:
    train: Any  # datasets.Dataset or IterableDataset of packed rows
    validation: Any  # always a map-style Dataset (it is small and re-read at every evaluation)
    train_rows: int | None  # None when streaming: the size is unknown until read
    seq_len: int

    @property
    def train_tokens(self) -> int | None:
        return None if self.train_rows is None else self.train_rows * self.seq_len


def load_documents(specs: list[SourceSpec], streaming: bool, seed: int):
    """One dataset of `text` documents mixed from several sources by weight."""
    from lmlab.data.sources import load_source, mix_sources

    loaded = [load_source(spec, streaming=streaming, seed=seed) for spec in specs]
    return mix_sources(loaded, [spec.weight for spec in specs], seed=seed)


def tokenize_and_pack(docs, tokenizer: "PreTrainedTokenizerBase", seq_len: int):
    """Tokenise `text` without special tokens (EOS separators are added when packing) and pack."""
    if tokenizer.eos_token_id is None:
        raise LmlabError("the tokenizer has no EOS token, which packing needs to separate documents")
    eos = tokenizer.eos_token_id
    columns = docs.column_names or ["text", "doc_id"]

    def tokenize(batch):
        return {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]}

    tokens = docs.map(tokenize, batched=True, remove_columns=columns)
    return tokens.map(pack_batch, batched=True, batch_size=1000, remove_columns=["input_ids"],
                      fn_kwargs={"seq_len": seq_len, "eos_id": eos})


def _leading_documents(docs, chars: int):
    """The first documents holding at least `chars` characters (so a small subset is not tokenised in full)."""
    total = 0
    for i, text in enumerate(docs["text"]):
        total += len(text)
        if total >= chars:
            return docs.select(range(i + 1))
    return docs


def build_packed_data(data: DataConfig, tokenizer: "PreTrainedTokenizerBase", seed: int,
                      max_validation_rows: int) -> PackedData:
    """Packed train and validation sets, behind one status line instead of per-map progress bars."""
    import datasets
    from lmlab.console import console as shared_console

    datasets.disable_progress_bars()
    with shared_console(stderr=True).status("loading, tokenising and packing the data"):
        return _build_packed_data(data, tokenizer, seed, max_validation_rows)


def _build_packed_data(data: DataConfig, tokenizer: "PreTrainedTokenizerBase", seed: int,
                       max_validation_rows: int) -> PackedData:
    from lmlab.data.sources import shuffle_documents, split_validation

    docs = load_documents(data.train, data.streaming, seed)
    if data.validation is not None:
        train_docs, val_docs = docs, load_documents(data.validation, False, seed)
    else:
        train_docs, val_docs = split_validation(docs, data.validation_fraction)
        if data.streaming:
            from datasets import Dataset

            val_docs = Dataset.from_list(list(val_docs.take(max_validation_rows * 8)))
    if data.unique_tokens is not None:  # one fixed subset for every seed; the seed still sets the order
        rows = -(-data.unique_tokens // data.seq_len)
        train = tokenize_and_pack(_leading_documents(shuffle_documents(train_docs, 0), 8 * data.unique_tokens),
                                  tokenizer, data.seq_len)
        if len(train) < rows:  # the 8 characters per token guess was short: tokenise everything
            train = tokenize_and_pack(shuffle_documents(train_docs, 0), tokenizer, data.seq_len)
        if len(train) < rows:
            raise LmlabError(f"data.unique_tokens={data.unique_tokens:,} but the training data has only "
                             f"{len(train) * data.seq_len:,} tokens", field="data.unique_tokens")
        train = train.select(range(rows)).shuffle(seed=seed)
    else:
        train_docs = shuffle_documents(train_docs, seed, data.shuffle_buffer)
        train = tokenize_and_pack(train_docs, tokenizer, data.seq_len)
    validation = tokenize_and_pack(val_docs, tokenizer, data.seq_len) if len(val_docs) else None
    if validation is not None:
        validation = validation.select(range(min(len(validation), max_validation_rows)))
        if len(validation) == 0:
            validation = None
    rows = None
    if not data.streaming:
        rows = len(train)
        if rows == 0:
            raise LmlabError(f"the training data has fewer than seq_len={data.seq_len} tokens",
                             field="data.train", hint="add data or lower data.seq_len")
        train = train.with_format("torch")
    else:
        train = train.with_format("torch")
    if validation is not None:
        validation = validation.with_format("torch")
    return PackedData(train=train, validation=validation, train_rows=rows, seq_len=data.seq_len)


@dataclass
class ReplayMix:
    """The exact composition of a CPT training set, in packed rows of seq_len tokens."""

    domain_rows: int
    replay_rows: int
    domain_unique_rows: int
    replay_unique_rows: int
    seq_len: int

    def report(self) -> dict[str, float]:
        total = self.domain_rows + self.replay_rows
        return {"domain_tokens": self.domain_rows * self.seq_len, "replay_tokens": self.replay_rows * self.seq_len,
                "replay_share": self.replay_rows / total if total else 0.0,
                "domain_epochs": self.domain_rows / self.domain_unique_rows,
                "replay_epochs": self.replay_rows / self.replay_unique_rows if self.replay_unique_rows else 0.0}


def _repeat_indices(n: int, k: int, seed: int) -> list[int]:
    """k row indices from n rows: whole shuffled passes, then part of one more (each pass its own order)."""
    import random

    out: list[int] = []
    epoch = 0
    while len(out) < k:
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        out += order[: k - len(out)]
        epoch += 1
    return out


def mix_replay(domain, replay, total_rows: int, ratio: float, seed: int, seq_len: int):
    """Exactly round(ratio * total_rows) replay rows and the rest domain rows (EvoLM CPT replay).

    Rows all hold seq_len tokens, so the share is exact in tokens; a source smaller than
    its share is repeated (the report says how many epochs of each the budget implies).
    """
    from datasets import concatenate_datasets

    replay_rows = round(ratio * total_rows) if replay is not None else 0
    domain_rows = total_rows - replay_rows
    parts = [domain.select(_repeat_indices(len(domain), domain_rows, seed))]
    if replay_rows:
        parts.append(replay.select(_repeat_indices(len(replay), replay_rows, seed + 1)))
    mix = ReplayMix(domain_rows, replay_rows, len(domain), len(replay) if replay is not None else 0, seq_len)
    return concatenate_datasets(parts).with_format("torch"), mix
