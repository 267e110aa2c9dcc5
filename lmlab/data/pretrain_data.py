"""From a recipe's data block to packed train and validation rows.

Map-style data goes through the token store (`lmlab.data.store`): each source is
tokenised once, split train/validation by a stable hash of each document's id,
and memory-mapped; rows are windows of it (`lmlab.data.rows`), mixed across
sources by weight and shuffled by the trainer's sampler. A second run, a resume
or another rank reuses the store and spends no time on tokenisation. Streaming
data (`data.streaming: true`, for sources larger than the disk) is tokenised on
the fly, a batch of documents at a time, with the same row semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from lmlab.data.packing import join_with_eos
from lmlab.errors import LmlabError
from lmlab.recipe import DataConfig, SourceSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmlab.data.rows import PackedRows

STREAM_DOCS = 512  # documents tokenised together when streaming


@dataclass
class PackedData:
    train: Any  # PackedRows (map-style), a datasets IterableDataset when streaming, or chat rows (distillation)
    validation: Any  # map-style rows, or None
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


def repeat_indices(n: int, k: int, seed: int) -> np.ndarray:
    """k row indices from n rows: whole shuffled passes, then part of one more (each pass its own order)."""
    passes = [np.random.default_rng([seed, epoch]).permutation(n) for epoch in range(-(-k // n))] if n else []
    return np.concatenate(passes)[:k] if passes else np.zeros(0, np.int64)


def mix_rows(sets: list["PackedRows"], weights: list[float], seed: int) -> "PackedRows":
    """Several sources' rows in proportion to their weights, every source seen at least once whole
    (the `all_exhausted` rule of `datasets.interleave_datasets`), in one shuffled order."""
    from lmlab.data.rows import PackedRows

    if len(sets) == 1:
        return sets[0]
    shares = np.asarray(weights, dtype=float) / sum(weights)
    total = max(len(rows) / share for rows, share in zip(sets, shares))
    picked = [rows.select(repeat_indices(len(rows), round(share * total), seed + i))
              for i, (rows, share) in enumerate(zip(sets, shares))]
    return PackedRows.concat(picked).shuffle(seed)


def source_stores(specs: list[SourceSpec], tokenizer, fraction: float, data: DataConfig, seed: int) -> list:
    from lmlab.data.store import prepare_store

    return [prepare_store(spec, tokenizer, fraction, seed, data.num_proc) for spec in specs]


def store_rows(stores: list, part: str, specs: list[SourceSpec], seq_len: int, seed: int) -> "PackedRows":
    from lmlab.data.rows import PackedRows

    return mix_rows([PackedRows([s.parts[part]], seq_len) for s in stores], [s.weight for s in specs], seed)


def build_packed_data(data: DataConfig, tokenizer: "PreTrainedTokenizerBase", seed: int,
                      max_validation_rows: int) -> PackedData:
    """Packed train and validation rows: from token stores, or streamed."""
    if tokenizer.eos_token_id is None:
        raise LmlabError("the tokenizer has no EOS token, which packing needs to separate documents")
    if data.streaming:
        return streamed_data(data, tokenizer, seed, max_validation_rows)
    fraction = data.validation_fraction if data.validation is None else 0.0
    stores = source_stores(data.train, tokenizer, fraction, data, seed)
    train = store_rows(stores, "train", data.train, data.seq_len, seed)
    if data.validation is not None:
        validation = store_rows(source_stores(data.validation, tokenizer, 0.0, data, seed), "train",
                                data.validation, data.seq_len, seed)
    else:
        validation = store_rows(stores, "validation", data.train, data.seq_len, seed)
    if data.unique_tokens is not None:  # one fixed subset for every seed; the seed still sets the order
        rows = -(-data.unique_tokens // data.seq_len)
        if len(train) < rows:
            raise LmlabError(f"data.unique_tokens={data.unique_tokens:,} but the training data has only "
                             f"{train.tokens():,} tokens", field="data.unique_tokens")
        train = train.shuffle(0).select(np.arange(rows))
    if len(train) == 0:
        raise LmlabError(f"the training data has fewer than seq_len={data.seq_len} tokens",
                         field="data.train", hint="add data or lower data.seq_len")
    validation = validation.select(np.arange(min(len(validation), max_validation_rows)))
    return PackedData(train=train, validation=validation if len(validation) else None, train_rows=len(train),
                      seq_len=data.seq_len)


def replay_block(data: DataConfig) -> DataConfig | None:
    """CPT's replay sources as a data block of their own (split into train and held-out like any data)."""
    return data.model_copy(update={"train": data.replay, "validation": None}) if data.replay else None


def uses_token_store(recipe) -> bool:
    """Whether a stage trains on packed text (pretraining, CPT, distillation on text) from token stores."""
    text = recipe.stage == "pretrain" or (recipe.stage == "distill" and recipe.distill.data_format == "text")
    return text and not recipe.data.streaming


def prepare_recipe_data(recipe, tokenizer) -> list:
    """Every token store a stage will read, found or built: its data and its replay sources."""
    blocks = [recipe.data, replay_block(recipe.data)]
    stores = []
    for block in filter(None, blocks):
        fraction = block.validation_fraction if block.validation is None else 0.0
        stores += source_stores(block.train, tokenizer, fraction, block, recipe.seed)
        stores += source_stores(block.validation or [], tokenizer, 0.0, block, recipe.seed)
    return stores


def stream_columns(docs, tokenizer, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    """Packed rows from a stream of `text` documents, a batch at a time, cut exactly as the store cuts them."""
    from lmlab.data.rows import window_columns
    from lmlab.data.store import StorePart

    backend = getattr(tokenizer, "backend_tokenizer", None)
    eos = tokenizer.eos_token_id
    carry, carry_starts = np.zeros(0, np.int64), np.zeros(0, np.int64)

    def flush(texts: list[str]):
        nonlocal carry, carry_starts
        ids = ([e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)] if backend is not None
               else tokenizer(texts, add_special_tokens=False)["input_ids"])
        flat, lengths = join_with_eos(ids, eos)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) + len(carry)
        tokens = np.concatenate([carry, flat])
        all_starts = np.concatenate([carry_starts, starts])
        n = len(tokens) // seq_len
        if n:
            cols = window_columns(StorePart(tokens, all_starts), np.arange(n), seq_len)
            for i in range(n):
                yield {k: v[i] for k, v in cols.items()}
        cut = n * seq_len
        carry, carry_starts = tokens[cut:], all_starts[all_starts >= cut] - cut

    texts: list[str] = []
    for row in docs:
        texts.append(row["text"])
        if len(texts) == STREAM_DOCS:
            yield from flush(texts)
            texts = []
    if texts:
        yield from flush(texts)


def streamed_rows(docs, tokenizer, seq_len: int):
    """A `datasets.IterableDataset` of rows with one shard per shard of `docs` (files, hub shards).

    Each shard is tokenised on its own (positions and labels as in the store), so DataLoader
    workers split the shards between them, and under several processes accelerate gives each
    rank its own shards (`IterableDataset.shard`) when there are at least as many shards as
    ranks; otherwise every rank reads the stream and keeps its slice of each batch.
    """
    from datasets import IterableDataset

    n_shards = max(1, getattr(docs, "num_shards", None) or getattr(docs, "n_shards", 1))

    def generate(shards: list[int]):
        for index in shards:
            part = docs.shard(num_shards=n_shards, index=index) if n_shards > 1 else docs
            yield from stream_columns(part, tokenizer, seq_len)

    return IterableDataset.from_generator(generate, gen_kwargs={"shards": list(range(n_shards))})


def streamed_data(data: DataConfig, tokenizer, seed: int, max_validation_rows: int) -> PackedData:
    """Rows tokenised on the fly from streamed documents (split by document hash, rows shuffled in a buffer)."""
    from lmlab.data.sources import split_validation

    docs = load_documents(data.train, True, seed)
    if data.validation is not None:
        train_docs, val_docs = docs, load_documents(data.validation, True, seed)
    else:
        train_docs, val_docs = split_validation(docs, data.validation_fraction)
    train = streamed_rows(train_docs, tokenizer, data.seq_len).shuffle(seed=seed, buffer_size=data.shuffle_buffer)
    val_rows = []
    for row in stream_columns(val_docs.take(max_validation_rows * 64), tokenizer, data.seq_len):
        val_rows.append(row)
        if len(val_rows) == max_validation_rows:
            break
    validation = None
    if val_rows:
        from datasets import Dataset

        validation = Dataset.from_dict({k: np.stack([r[k] for r in val_rows]) for k in val_rows[0]})
        validation = validation.with_format("torch")
    return PackedData(train=train.with_format("torch"), validation=validation, train_rows=None, seq_len=data.seq_len)


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


def mix_replay(domain: "PackedRows", replay: "PackedRows | None", total_rows: int, ratio: float, seed: int,
               seq_len: int):
    """Exactly round(ratio * total_rows) replay rows and the rest domain rows (EvoLM CPT replay).

    Rows all hold seq_len tokens, so the share is exact in tokens; a source smaller than
    its share is repeated (the report says how many epochs of each the budget implies).
    """
    from lmlab.data.rows import PackedRows

    replay_rows = round(ratio * total_rows) if replay is not None else 0
    domain_rows = total_rows - replay_rows
    parts = [domain.select(repeat_indices(len(domain), domain_rows, seed))]
    if replay_rows:
        parts.append(replay.select(repeat_indices(len(replay), replay_rows, seed + 1)))
    mix = ReplayMix(domain_rows, replay_rows, len(domain), len(replay) if replay is not None else 0, seq_len)
    return PackedRows.concat(parts), mix
