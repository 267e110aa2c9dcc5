"""Load any data source into a `datasets` object with `text` and `doc_id` columns.

Every source, whatever its format, becomes documents with a stable id, so that
the train/validation split (a hash of the id) is identical streamed or not and in
any order. Bad input (a malformed jsonl line, a missing column, an empty source,
an unreachable hub) is an LmlabError naming the file, line and field.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from lmlab.errors import LmlabError
from lmlab.recipe import LOCAL_KINDS, RECORD_KINDS, SourceSpec

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".csv", ""}
# the files a directory given as a source holds, by source kind (a glob or a file path is taken as given)
DIRECTORY_SUFFIXES = {"text": TEXT_SUFFIXES, "jsonl": {".jsonl", ".json", ".ndjson", ".gz"}, "csv": {".csv"},
                      "parquet": {".parquet"}}
INTEGER = re.compile(r"-?\d+")


def read_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """`(line_number, record)` of a records file: csv (a header row, then one record per row), or jsonl."""
    if str(path).lower().endswith(".csv"):
        return read_csv(Path(path))
    return read_jsonl(path)


def read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    """Rows of a csv file with a header, numbered by file line; whole-number cells become ints (an answer
    column), as a csv loader that infers column types would make them."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise LmlabError("a csv file needs a header row naming its columns", file=str(path), line=1)
            for row in reader:
                if None in row:
                    raise LmlabError(f"more cells than the {len(reader.fieldnames)} columns of the header",
                                     file=str(path), line=reader.line_num)
                yield reader.line_num, {k: int(v) if v is not None and INTEGER.fullmatch(v) else v
                                        for k, v in row.items()}
    except UnicodeDecodeError:
        raise LmlabError("not UTF-8 text", file=str(path), line=first_undecodable_line(path)) from None
    except csv.Error as exc:
        raise LmlabError(f"malformed csv ({exc})", file=str(path)) from None


def is_json_array(path: Path) -> bool:
    """A `.json` file holding one JSON array (not one object per line): read whole, never split by lines."""
    if path.suffix != ".json":
        return False
    with open(path, "rb") as fh:
        return fh.read(4096).lstrip().startswith(b"[")


def read_json_array(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    """`(line_number, record)` for each object of a JSON array file (LLaMA-Factory's alpaca / sharegpt
    files), each numbered by the line its object starts on."""
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            record, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise LmlabError(f"malformed JSON ({exc.msg})", file=str(path), line=exc.lineno) from None
        if not isinstance(record, dict):
            raise LmlabError("each element of the array must be a JSON object", file=str(path), line=line)
        yield line, record


def json_object(line: str | bytes, path: str | Path, number: int) -> dict:
    """One line of a jsonl file as its object; malformed JSON, bad UTF-8 or a non-object is an error naming
    file and line (the one check for every reader of jsonl lines, the token store's workers included)."""
    try:
        record = json.loads(line)
    except UnicodeDecodeError:
        raise LmlabError("not UTF-8 text", file=str(path), line=number) from None
    except json.JSONDecodeError as exc:
        raise LmlabError(f"malformed JSON ({exc.msg} at column {exc.colno})", file=str(path), line=number) from None
    if not isinstance(record, dict):
        raise LmlabError("each line must be a JSON object", file=str(path), line=number)
    return record


def open_parquet(path: str | Path):
    """A parquet file's reader; a file that is not parquet is an error naming it."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path))
    except (pyarrow.ArrowInvalid, OSError) as exc:
        raise LmlabError(f"not a parquet file ({exc})", file=str(path)) from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """`(line_number, record)` for each non-blank line, or each object of a file holding one JSON array;
    a bad line is an error naming file and line."""
    if is_json_array(Path(path)):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LmlabError("not UTF-8 text", file=str(path), line=first_undecodable_line(path)) from None
        yield from read_json_array(Path(path), text)
        return
    opener = open
    if str(path).endswith(".gz"):
        import gzip

        opener = gzip.open  # type: ignore[assignment]
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, start=1):
                if line.strip():
                    yield number, json_object(line, path, number)
    except UnicodeDecodeError:
        raise LmlabError("not UTF-8 text", file=str(path), line=first_undecodable_line(path)) from None
    except (EOFError, OSError) as exc:  # gzip.BadGzipFile is an OSError; a truncated .gz an EOFError
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise LmlabError(f"not a readable gzip file ({exc})", file=str(path)) from None


def first_undecodable_line(path: str | Path) -> int | None:
    """The 1-based line where UTF-8 decoding first fails (text-mode reads decode ahead in chunks)."""
    import gzip

    try:
        data = gzip.decompress(Path(path).read_bytes()) if str(path).endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError):
        return None
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return None


def local_files(pattern: str, kind: str = "text") -> list[Path]:
    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        suffixes = DIRECTORY_SUFFIXES.get(kind, TEXT_SUFFIXES)
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                      and not any(part.startswith(".") for part in p.relative_to(path).parts))
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())


def _text_rows(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    for path in local_files(spec.path, spec.kind):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LmlabError("not UTF-8 text", file=str(path), line=first_undecodable_line(path)) from None
        if text.strip():
            yield {"text": text, "doc_id": str(path)}


def _jsonl_rows(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    for path in local_files(spec.path, spec.kind):
        for number, record in read_records(path):
            if spec.field not in record:
                raise LmlabError(f"missing field '{spec.field}'", file=str(path), line=number, field=spec.field)
            value = record[spec.field]
            row = {"doc_id": f"{path}:{number}"}
            if isinstance(value, str):
                row["text"] = value
            else:  # records (chat messages, prompt/answer) keep their structure
                row["text"] = ""
                row[spec.field] = value
            yield row


def _general_rows(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    from lmlab.data.general import general_documents

    for doc_id, text in general_documents():
        yield {"text": text, "doc_id": doc_id}


def _math_rows(spec: SourceSpec, seed: int) -> Iterator[dict[str, Any]]:
    from lmlab.data.mathgen import as_text, source_problems

    split = "id" if spec.split == "train" else spec.split
    for i, problem in enumerate(source_problems(spec, seed)):
        row: dict[str, Any] = {"doc_id": f"math-{split}-{spec.seed if spec.seed is not None else seed}-{i}",
                               "text": as_text(problem)}
        if spec.format == "chat":
            from lmlab.data.mathgen import as_chat

            row["messages"] = as_chat(problem)["messages"]
        elif spec.format == "prompt":
            row.update(prompt=problem.prompt, answer=problem.answer)
        yield row


def _limited(rows: Iterator[dict], limit: int | None) -> Iterator[dict]:
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _from_generator(make_rows, spec: SourceSpec, streaming: bool, **kwargs):
    """A Dataset or IterableDataset over a row generator; map-style ones are checked for emptiness.

    A streamed source of several local files has one shard per file (when no `limit` counts across
    them), so DataLoader workers and ranks each read their own files instead of all reading everything.
    """
    from datasets import Dataset, IterableDataset

    def gen(files: list[str] | None = None, **_):
        if files is None:
            yield from _limited(make_rows(spec, **kwargs), spec.limit)
            return
        for file in files:
            yield from make_rows(spec.model_copy(update={"path": file}), **kwargs)

    if streaming:
        first = next(gen(), None)
        if first is None:
            raise LmlabError(f"the {spec.kind} source has no documents", file=spec.path, field="data")
        files = [str(p) for p in local_files(spec.path, spec.kind)] if spec.kind in ("text", *RECORD_KINDS) else []
        if len(files) > 1 and spec.limit is None:
            return IterableDataset.from_generator(gen, gen_kwargs={"files": files})
        return IterableDataset.from_generator(gen, gen_kwargs={"_key": json.dumps(spec.model_dump(), sort_keys=True)})
    rows = list(gen())
    if not rows:
        raise LmlabError(f"the {spec.kind} source has no documents", file=spec.path, field="data")
    return Dataset.from_list(rows)


def _arrow_rows(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    """Parquet files (each schema read, then the column scanned) or a `save_to_disk` directory, row by row."""
    if spec.kind == "disk":
        yield from _arrow_source(spec, streaming=True)
        return
    for path in local_files(spec.path, spec.kind):
        table = open_parquet(path)
        if spec.field not in table.schema_arrow.names:
            raise LmlabError(f"missing column '{spec.field}' (has {', '.join(table.schema_arrow.names)})",
                             file=str(path), field=spec.field)
        for batch in table.iter_batches(columns=[spec.field]):
            for value in batch.column(0).to_pylist():
                yield {"text": value if isinstance(value, str) else "", "doc_id": str(path)}


def _rows_reader(spec: SourceSpec, seed: int = 0) -> Callable[[], Iterator[dict[str, Any]]] | None:
    """The one dispatch on a source's kind: a reader of its documents as rows (`text`, `doc_id`), or None
    for a hub dataset, which only `datasets` reads."""
    readers = {"general": _general_rows, "math": lambda s: _math_rows(s, seed), "text": _text_rows,
               "parquet": _arrow_rows, "disk": _arrow_rows, **{kind: _jsonl_rows for kind in RECORD_KINDS}}
    reader = readers.get(spec.kind)
    return None if reader is None else lambda: reader(spec)


def source_rows(spec: SourceSpec) -> Iterator[dict[str, Any]]:
    """A local source's documents one at a time, checked as they are read (the preflight reads them all)."""
    if spec.kind not in LOCAL_KINDS:
        raise ValueError(f"not a local source: {spec.kind}")
    return document_rows(spec)


def document_rows(spec: SourceSpec, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Any source's documents one at a time; generated and local kinds without building a `datasets` object."""
    reader = _rows_reader(spec, seed)
    return iter(_hub_source(spec, streaming=True)) if reader is None else _limited(reader(), spec.limit)


def _arrow_source(spec: SourceSpec, streaming: bool):
    """Parquet files or a `save_to_disk` directory, with `text` and `doc_id` columns added."""
    import datasets

    if spec.kind == "parquet":
        files = [str(p) for p in local_files(spec.path, spec.kind)]
        ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
        where = files[0]
    else:
        try:
            loaded = datasets.load_from_disk(spec.path)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise LmlabError(f"not a datasets directory ({exc})", file=spec.path) from None
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise LmlabError(f"no split '{spec.split}' (has {', '.join(loaded)})", file=spec.path, field="split")
            loaded = loaded[spec.split]
        ds = loaded.to_iterable_dataset() if streaming else loaded
        where = spec.path
    columns = ds.column_names or list(ds.features or {})
    if spec.field not in columns:
        raise LmlabError(f"missing column '{spec.field}' (has {', '.join(columns)})", file=where, field=spec.field)
    if spec.limit is not None:
        ds = ds.take(spec.limit) if streaming else ds.select(range(min(spec.limit, len(ds))))
    prefix = spec.path

    def add_ids(batch, indices):
        out = {"doc_id": [f"{prefix}#{i}" for i in indices]}
        if spec.field != "text":
            out["text"] = [v if isinstance(v, str) else "" for v in batch[spec.field]]
        return out

    ds = ds.map(add_ids, batched=True, with_indices=True)
    if not streaming and len(ds) == 0:
        raise LmlabError("the source has no documents", file=where, field="data")
    return ds


def _hub_source(spec: SourceSpec, streaming: bool):
    import datasets

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        raise LmlabError(f"the hub is unreachable (offline mode), cannot load '{spec.path}'", field="data",
                         hint="download it elsewhere and point to a local jsonl, parquet or save_to_disk directory")
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=spec.split, streaming=streaming)
    except Exception as exc:  # connection errors come in many types; all mean the same to the user
        raise LmlabError(f"cannot load hub dataset '{spec.path}': {type(exc).__name__}: {exc}"[:400], field="data",
                         hint="check the name and the network, or use a local copy") from None
    if spec.field not in (ds.column_names or []):
        raise LmlabError(f"hub dataset '{spec.path}' has no column '{spec.field}'", field=spec.field)
    if spec.limit is not None:
        ds = ds.take(spec.limit) if streaming else ds.select(range(min(spec.limit, len(ds))))
    return ds.map(lambda b, idx: {"doc_id": [f"{spec.path}#{i}" for i in idx],
                                  "text": b[spec.field]}, batched=True, with_indices=True)


def load_source(spec: SourceSpec, *, streaming: bool = False, seed: int = 0):
    """A `datasets.Dataset` (or `IterableDataset` when streaming) with `text` and `doc_id` columns; streamed
    local sources are validated lazily, their errors still naming file and line."""
    if spec.kind in ("parquet", "disk"):
        return _arrow_source(spec, streaming)
    if _rows_reader(spec) is None:
        return _hub_source(spec, streaming)
    return _from_generator(lambda s: _rows_reader(s, seed)(), spec, streaming)


def split_validation(ds, fraction: float):
    """Train and validation parts chosen by the hash of each `doc_id`: order- and streaming-independent."""
    from datasets import Dataset

    from lmlab.data.split import doc_hash, held_out_indices, is_held_out

    if fraction <= 0:
        return ds, ds.select([]) if isinstance(ds, Dataset) else ds.take(0)
    if isinstance(ds, Dataset):  # the one rule, at least one held out included (data.split)
        held = held_out_indices([doc_hash(i) for i in ds["doc_id"]], fraction)
        chosen = set(held.tolist())
        return ds.select([i for i in range(len(ds)) if i not in chosen]), ds.select(held)
    return (ds.filter(lambda r: not is_held_out(r["doc_id"], fraction)),
            ds.filter(lambda r: is_held_out(r["doc_id"], fraction)))


def mix_sources(loaded: list, weights: list[float], seed: int):
    """One source as is; several interleaved with probabilities proportional to their weights."""
    if len(loaded) == 1:
        return loaded[0]
    from datasets import interleave_datasets

    keep = [ds.select_columns(["text", "doc_id"]) for ds in loaded]
    total = sum(weights)
    return interleave_datasets(keep, probabilities=[w / total for w in weights], seed=seed,
                               stopping_strategy="all_exhausted")
