"""The token store: a source tokenised once into flat token files that every run, resume and rank memory-maps.

The layout is nanoGPT's `prepare.py` memmap and Megatron-LM's `.bin`/`.idx` pair:
for each part (`train`, `validation`) `<part>.bin` holds every document's tokens
followed by EOS, as uint16 when the vocabulary fits (2 bytes a token) and uint32
otherwise, and `<part>.idx` holds the int64 offset where each document starts.
`meta.json` says what the store was built from. Rows are windows over the flat
array (`lmlab.data.rows`), so nothing is copied or re-tokenised at run time.

Why not datatrove or `datasets`: datatrove parallelises by input file (one big
jsonl is one task) and orders its output by task, so the tokens would depend on
the number of processes; `datasets` keeps token lists with per-row offsets and
tokenises through Python `map` calls at half the bare tokenizer's speed.

A store's directory name is the hash of everything that changes its tokens: the
source settings, the content hash of each file, the tokenizer and the validation
share (the train/validation split by document hash happens here, once). It is
written under a temporary name and renamed when complete, so a killed build is
never read; under several processes one process per node builds while the others
wait at a barrier, and a file lock makes concurrent runs on one machine take turns.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmlab.data.cache import cache_dir, file_hash, locked
from lmlab.data.packing import join_with_eos
from lmlab.data.sources import json_object
from lmlab.data.split import doc_hash, is_held_out
from lmlab.errors import LmlabError
from lmlab.recipe import SourceSpec

STORE_VERSION = 1
PARTS = ("train", "validation")
CHUNK_BYTES = 1 << 20  # a jsonl work item; fixed, so the output never depends on the number of processes
DOCS_PER_CHUNK = 512  # a work item of documents read by the main process
IN_FLIGHT_PER_PROC = 3  # work items queued per process: enough to keep them busy, few enough to bound memory


def store_root() -> Path:
    return cache_dir() / "stores"


def tokenizer_hash(tokenizer) -> str:
    """What fixes the token ids: the tokenizer's full definition and its EOS id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.blake2b(f"{text}\n{tokenizer.eos_token_id}".encode(), digest_size=16).hexdigest()


def _module_hash(module: str) -> str:
    import importlib.util

    origin = importlib.util.find_spec(module).origin
    return file_hash(origin)


def source_fingerprint(spec: SourceSpec, seed: int) -> dict[str, Any]:
    """The source settings that change its documents, with the content hash of each local file."""
    from lmlab.data.sources import local_files

    settings = spec.model_dump(mode="json", exclude={"weight"})
    if spec.kind in ("text", "jsonl", "csv", "parquet"):
        return {"source": settings, "files": [[str(p), file_hash(p)] for p in local_files(spec.path, spec.kind)]}
    if spec.kind == "disk":
        files = sorted(p for p in Path(spec.path).rglob("*") if p.is_file())
        return {"source": settings, "files": [[str(p), file_hash(p)] for p in files]}
    if spec.kind == "general":
        return {"source": settings, "python": sys.version, "generator": _module_hash("lmlab.data.general")}
    if spec.kind == "math":
        return {"source": settings, "seed": spec.seed if spec.seed is not None else seed,
                "generator": _module_hash("lmlab.data.mathgen")}
    return {"source": settings}  # a hub dataset is identified by its name, config and split


def store_key(spec: SourceSpec, tokenizer, validation_fraction: float, seed: int) -> tuple[str, dict]:
    identity = {"version": STORE_VERSION, **source_fingerprint(spec, seed), "tokenizer": tokenizer_hash(tokenizer),
                "validation_fraction": validation_fraction}
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=12).hexdigest()
    return digest, identity


def _checked_marker(spec: SourceSpec, seed: int) -> Path:
    identity = json.dumps(source_fingerprint(spec, seed), sort_keys=True)
    return cache_dir() / "checked" / hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()


def was_checked(spec: SourceSpec, seed: int = 0) -> bool:
    """Whether a store was built from exactly these files (building read and checked every record)."""
    return _checked_marker(spec, seed).is_file()


def mark_checked(spec: SourceSpec, seed: int) -> None:
    marker = _checked_marker(spec, seed)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only cache only costs a re-read in the next preflight


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class StorePart:
    """One part's flat tokens (memory-mapped) and the offset where each document starts."""

    tokens: np.ndarray
    starts: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, seq_len: int) -> int:
        return self.n_tokens // seq_len  # the incomplete tail is dropped, as packing always did


@dataclass
class TokenStore:
    path: Path
    meta: dict[str, Any]
    parts: dict[str, StorePart] = field(default_factory=dict)

    @property
    def train(self) -> StorePart:
        return self.parts["train"]

    @property
    def validation(self) -> StorePart:
        return self.parts["validation"]


def _part_files(path: Path, part: str) -> tuple[Path, Path]:
    return path / f"{part}.bin", path / f"{part}.idx"


def is_complete(path: Path) -> bool:
    """A renamed store whose files hold exactly what its meta.json says (a truncated copy is rebuilt)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for part in PARTS:
            bin_file, idx_file = _part_files(path, part)
            if bin_file.stat().st_size != meta[part]["tokens"] * itemsize or \
                    idx_file.stat().st_size != meta[part]["documents"] * 8:
                return False
        return meta.get("version") == STORE_VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return False


def open_store(path: str | Path, tokenizer=None) -> TokenStore:
    """Memory-map a complete store; with `tokenizer`, refuse one built with another tokenizer."""
    path = Path(path)
    if not is_complete(path):
        raise LmlabError("not a complete lmlab token store", file=str(path), hint="run `lmlab data prepare` again")
    meta = json.loads((path / "meta.json").read_text())
    if tokenizer is not None and meta["identity"]["tokenizer"] != tokenizer_hash(tokenizer):
        raise LmlabError("this token store was built with another tokenizer", file=str(path / "meta.json"),
                         field="tokenizer", hint="prepare it again with this recipe's tokenizer")
    store = TokenStore(path, meta)
    for part in PARTS:
        bin_file, idx_file = _part_files(path, part)
        n = meta[part]["tokens"]
        tokens = np.memmap(bin_file, dtype=meta["dtype"], mode="r", shape=(n,)) if n else np.zeros(0, meta["dtype"])
        starts = np.fromfile(idx_file, dtype=np.int64)
        store.parts[part] = StorePart(tokens, starts)
    return store


# ---------------------------------------------------------------------------------------------------- work items


@dataclass
class Chunk:
    """A unit of tokenisation work: a byte range of a jsonl file, or documents the main process read."""

    path: str | None = None
    start: int = 0
    end: int = 0
    first_line: int = 1
    docs: list[tuple[str, str]] | None = None
    size: int = 0  # bytes or characters, for the progress bar


def _jsonl_chunks(path: Path) -> Iterator[Chunk]:
    """Byte ranges of about CHUNK_BYTES ending at a newline, with the line number each starts at."""
    size = path.stat().st_size
    start, line = 0, 1
    with open(path, "rb") as fh:
        while start < size:
            fh.seek(start)
            block = fh.read(CHUNK_BYTES)
            end = start + len(block)
            if end < size:  # extend to the end of the line the boundary falls in
                rest = b""
                while not rest.endswith(b"\n") and end < size:
                    piece = fh.readline()
                    if not piece:
                        break
                    rest += piece
                    end += len(piece)
                block += rest
            yield Chunk(path=str(path), start=start, end=end, first_line=line, size=end - start)
            line += block.count(b"\n")
            start = end


def _document_chunks(spec: SourceSpec, seed: int) -> Iterator[Chunk]:
    """Documents read here (any kind), DOCS_PER_CHUNK at a time."""
    from lmlab.data.sources import document_rows

    rows = document_rows(spec, seed)
    docs: list[tuple[str, str]] = []
    chars = 0
    for row in rows:
        docs.append((row["doc_id"], row["text"]))
        chars += len(row["text"])
        if len(docs) == DOCS_PER_CHUNK:
            yield Chunk(docs=docs, size=chars)
            docs, chars = [], 0
    if docs:
        yield Chunk(docs=docs, size=chars)


def plan_chunks(spec: SourceSpec, seed: int) -> tuple[Iterator[Chunk], int | None]:
    """The work items of a source, and their total size when it is known up front (for the ETA)."""
    from lmlab.data.sources import is_json_array, local_files

    files = local_files(spec.path, spec.kind) if spec.kind == "jsonl" else []
    # line-delimited files split into byte ranges; a gzip file or a JSON array is read whole, in order
    if files and spec.limit is None and not any(str(p).endswith(".gz") or is_json_array(p) for p in files):
        total = sum(p.stat().st_size for p in files)
        return (chunk for p in files for chunk in _jsonl_chunks(p)), total
    if spec.kind == "text":
        return _document_chunks(spec, seed), sum(p.stat().st_size for p in local_files(spec.path, spec.kind))
    return _document_chunks(spec, seed), None


# ---------------------------------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def _init_worker(settings: dict[str, Any]) -> None:
    """Per process: the tokenizer (rebuilt from its JSON when fast) and the split settings."""
    global _WORKER
    settings = dict(settings)
    if settings.get("tokenizer_json") is not None:
        from tokenizers import Tokenizer

        settings["backend"] = Tokenizer.from_str(settings.pop("tokenizer_json"))
    _WORKER = settings


def _jsonl_documents(chunk: Chunk) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of each line of a byte range, checked as `lmlab.data.sources.read_jsonl` checks."""
    field_name = _WORKER["field"]
    with open(chunk.path, "rb") as fh:
        fh.seek(chunk.start)
        data = fh.read(chunk.end - chunk.start)
    for number, raw in enumerate(data.split(b"\n"), start=chunk.first_line):
        if not raw.strip():
            continue
        record = json_object(raw, chunk.path, number)
        if field_name not in record:
            raise LmlabError(f"missing field '{field_name}'", file=chunk.path, line=number, field=field_name)
        value = record[field_name]
        yield f"{chunk.path}:{number}", value if isinstance(value, str) else ""


def _encode(texts: list[str]) -> list[list[int]]:
    backend = _WORKER.get("backend")
    if backend is not None:
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return _WORKER["tokenizer"](texts, add_special_tokens=False)["input_ids"]


def tokenize_chunk(chunk: Chunk) -> dict[str, Any]:
    """A work item's documents, routed to train or validation by doc hash, tokenised and joined."""
    docs = chunk.docs if chunk.docs is not None else list(_jsonl_documents(chunk))
    fraction, held = _WORKER["fraction"], _WORKER["held"]
    groups: dict[str, list[str]] = {"train": [], "validation": []}
    lowest = (2.0, None)
    for doc_id, text in docs:
        h = doc_hash(doc_id) if fraction else 1.0
        if fraction and (is_held_out(doc_id, fraction) or doc_id in held):
            groups["validation"].append(text)
        else:
            groups["train"].append(text)
            lowest = min(lowest, (h, doc_id), key=lambda x: x[0])
    out: dict[str, Any] = {"chars": sum(len(t) for _, t in docs), "size": chunk.size, "lowest": lowest}
    for part, texts in groups.items():
        out[part] = join_with_eos(_encode(texts), _WORKER["eos"], _WORKER["dtype"]) if texts else None
    return out


# ---------------------------------------------------------------------------------------------------- building


def _ordered_results(chunks: Iterator[Chunk], num_proc: int, settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """tokenize_chunk over the chunks, in order, with at most a few items in flight per process."""
    if num_proc <= 1:
        _init_worker(settings)
        for chunk in chunks:
            yield tokenize_chunk(chunk)
        return
    import multiprocessing

    context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with context.Pool(num_proc, initializer=_init_worker, initargs=(settings,)) as pool:
        pending = []
        for chunk in chunks:
            pending.append(pool.apply_async(tokenize_chunk, (chunk,)))
            if len(pending) >= num_proc * IN_FLIGHT_PER_PROC:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()


def _worker_settings(tokenizer, spec: SourceSpec, fraction: float, held: set[str]) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return {"tokenizer_json": backend.to_str() if backend is not None else None,
            "tokenizer": None if backend is not None else tokenizer, "eos": tokenizer.eos_token_id,
            "dtype": token_dtype(len(tokenizer)), "fraction": fraction, "held": held, "field": spec.field}


class _PartWriter:
    """Appends token arrays to `<part>.bin` and remembers document lengths for `<part>.idx`."""

    def __init__(self, path: Path, part: str):
        self.bin_file, self.idx_file = _part_files(path, part)
        self.handle = open(self.bin_file, "wb")
        self.lengths: list[np.ndarray] = []
        self.tokens = self.documents = 0

    def add(self, piece: tuple[np.ndarray, np.ndarray] | None) -> None:
        if piece is None:
            return
        tokens, lengths = piece
        tokens.tofile(self.handle)
        self.lengths.append(lengths)
        self.tokens += int(tokens.shape[0])
        self.documents += int(lengths.shape[0])

    def close(self) -> dict[str, int]:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
        starts.tofile(self.idx_file)
        return {"tokens": self.tokens, "documents": int(len(lengths))}


def _write_parts(tmp: Path, spec: SourceSpec, tokenizer, fraction: float, held: set[str], num_proc: int,
                 seed: int, progress) -> dict[str, Any]:
    chunks, total = plan_chunks(spec, seed)
    progress.start(total)
    writers = {part: _PartWriter(tmp, part) for part in PARTS}
    chars, lowest = 0, (2.0, None)
    for result in _ordered_results(chunks, num_proc, _worker_settings(tokenizer, spec, fraction, held)):
        for part in PARTS:
            writers[part].add(result[part])
        chars += result["chars"]
        lowest = min(lowest, result["lowest"], key=lambda x: x[0])
        progress.advance(result["size"], sum(w.tokens for w in writers.values()),
                         sum(w.documents for w in writers.values()))
    summary = {part: writer.close() for part, writer in writers.items()}
    return {**summary, "chars": chars, "lowest_train_doc": lowest[1]}


def build_store(path: Path, spec: SourceSpec, tokenizer, fraction: float, identity: dict, num_proc: int,
                seed: int, progress) -> None:
    """Tokenise a source into a temporary directory and rename it to `path` once every file is complete."""
    from lmlab.paths import remove_tree

    for stale in path.parent.glob(f"{path.name}.tmp-*"):  # a killed build's; the caller holds the store's lock
        remove_tree(stale, path.parent)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    began = time.perf_counter()
    try:
        held: set[str] = set()
        summary = _write_parts(tmp, spec, tokenizer, fraction, held, num_proc, seed, progress)
        if summary["train"]["documents"] + summary["validation"]["documents"] == 0:
            raise LmlabError(f"the {spec.kind} source has no documents", file=spec.path, field="data")
        if fraction and summary["validation"]["documents"] == 0 and summary["train"]["documents"] > 1:
            # no document hashed under the fraction: hold out the lowest one, as lmlab.data.split does
            held = {summary["lowest_train_doc"]}
            summary = _write_parts(tmp, spec, tokenizer, fraction, held, num_proc, seed, progress)
        meta = {"version": STORE_VERSION, "identity": identity, "dtype": np.dtype(token_dtype(len(tokenizer))).name,
                "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "held_out": sorted(held),
                "source": spec.model_dump(mode="json"), "seconds": round(time.perf_counter() - began, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_proc": num_proc, **summary}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # so `lmlab data inspect` can decode the store on its own
            (tmp / "tokenizer.json").write_text(backend.to_str())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if path.exists():  # an incomplete store (truncated, or from another lmlab version) makes way
            remove_tree(path, path.parent)
        os.replace(tmp, path)
        mark_checked(spec, seed)
    finally:
        if tmp.exists():
            remove_tree(tmp, path.parent)
        progress.stop()


def default_num_proc() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def prepare_store(spec: SourceSpec, tokenizer, validation_fraction: float, seed: int = 0,
                  num_proc: int | None = None, progress=None) -> TokenStore:
    """The store for one source: found by its key, or built (one process per node; the others wait)."""
    from lmlab.distributed import main_first

    key, identity = store_key(spec, tokenizer, validation_fraction, seed)
    path = store_root() / key
    with main_first(per_node=True) as leader:  # one builder per node; its failure stops every rank
        if leader and not is_complete(path):
            with locked(store_root() / f"{key}.lock"):
                if not is_complete(path):
                    build_store(path, spec, tokenizer, validation_fraction, identity,
                                num_proc or default_num_proc(), seed, progress or StoreProgress(spec))
    store = open_store(path)
    if progress is None or not progress.quiet:
        from lmlab.console import console

        tokens = store.meta["train"]["tokens"] + store.meta["validation"]["tokens"]
        console().print(f"token store {key}: {tokens:,} tokens of {spec.path or spec.kind}")
    return store


# ---------------------------------------------------------------------------------------------------- progress


class StoreProgress:
    """A progress bar (size, tokens/s, ETA) on a terminal; one summary line per store in a log file."""

    def __init__(self, spec: SourceSpec | None = None, quiet: bool = False):
        self.label = f"tokenising {spec.path or spec.kind}" if spec is not None else "tokenising"
        self.quiet = quiet
        self.bar = None
        self.task = None
        self.began = 0.0
        self.tokens = self.docs = 0

    def start(self, total: int | None) -> None:
        from lmlab.console import console, on_terminal

        self.began = time.perf_counter()
        if self.quiet or not on_terminal():
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[stats]}"),
                            TimeRemainingColumn(), console=console(), transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=total, stats="")

    def advance(self, size: int, tokens: int, docs: int) -> None:
        self.tokens, self.docs = tokens, docs
        if self.bar is not None:
            rate = tokens / max(time.perf_counter() - self.began, 1e-9)
            self.bar.update(self.task, advance=size, stats=f"{docs:,} docs, {tokens:,} tokens, {rate / 1e6:.2f}M tok/s")

    def stop(self) -> None:
        from lmlab.console import console

        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if not self.quiet and self.tokens:
            seconds = time.perf_counter() - self.began
            console().print(f"{self.label}: {self.docs:,} documents, {self.tokens:,} tokens in {seconds:.1f} s "
                            f"({self.tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s)")


def list_stores() -> list[dict[str, Any]]:
    """Every complete store in the cache, with its meta and size on disk."""
    root = store_root()
    out = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.is_dir() and ".tmp-" not in path.name and is_complete(path):
            meta = json.loads((path / "meta.json").read_text())
            size = sum(p.stat().st_size for p in path.iterdir())
            out.append({"key": path.name, "path": path, "bytes": size, "meta": meta})
    return out
