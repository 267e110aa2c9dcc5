"""The token store: the same rows as packing, built once, identical for any num_proc, never read half-written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmlab.data.packing import pack_token_lists
from lmlab.errors import LmlabError
from lmlab.recipe import DataConfig, SourceSpec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("LMLAB_CACHE", str(path))
    return path


def write_corpus(path: Path, n: int = 120, start: int = 0) -> list[str]:
    from lmlab.data.general import general_documents

    texts = [text for _, text in general_documents(limit=start + n)][start:]
    texts.insert(3, "")  # an empty document is still a document: it packs as a lone EOS
    with open(path, "w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text, "meta": 1}) + "\n")
    return texts


def store_rows(spec, tokenizer, seq_len, fraction=0.0, num_proc=1):
    from lmlab.data.rows import PackedRows
    from lmlab.data.store import StoreProgress, prepare_store

    store = prepare_store(spec, tokenizer, fraction, 0, num_proc, StoreProgress(quiet=True))
    return store, PackedRows([store.train], seq_len)


def test_rows_equal_packing_token_for_token(tmp_path, cache, tiny_tokenizer):
    texts = write_corpus(tmp_path / "c.jsonl")
    _, rows = store_rows(SourceSpec(kind="jsonl", path=str(tmp_path / "c.jsonl")), tiny_tokenizer, 37)
    ids = tiny_tokenizer(texts, add_special_tokens=False)["input_ids"]
    expected = list(pack_token_lists(ids, 37, tiny_tokenizer.eos_token_id))
    got = rows.to_dict()
    assert len(expected) == len(rows) > 100
    for key in ("input_ids", "position_ids", "labels"):
        assert got[key] == [row[key] for row in expected], key
    single = rows[5]  # one row through __getitem__ is the same as through a batch
    assert single["labels"].tolist() == expected[5]["labels"]


def test_output_is_identical_for_any_num_proc(tmp_path, monkeypatch, tiny_tokenizer):
    import lmlab.data.store as store_module

    write_corpus(tmp_path / "c.jsonl", n=200)
    monkeypatch.setattr(store_module, "CHUNK_BYTES", 16_384)  # many work items, so both processes get some
    spec = SourceSpec(kind="jsonl", path=str(tmp_path / "c.jsonl"))
    built = []
    for num_proc in (1, 2):
        monkeypatch.setenv("LMLAB_CACHE", str(tmp_path / f"cache{num_proc}"))
        store, _ = store_rows(spec, tiny_tokenizer, 64, fraction=0.05, num_proc=num_proc)
        assert store.meta["num_proc"] == num_proc
        built.append(store.path)
    assert built[0].name == built[1].name  # the key does not depend on num_proc
    for name in ("train.bin", "train.idx", "validation.bin", "validation.idx"):
        assert (built[0] / name).read_bytes() == (built[1] / name).read_bytes(), name


def test_second_run_finds_the_store_and_an_edit_rebuilds_it(tmp_path, cache, tiny_tokenizer):
    from lmlab.data.store import list_stores

    path = tmp_path / "c.jsonl"
    write_corpus(path)
    spec = SourceSpec(kind="jsonl", path=str(path))
    first, rows = store_rows(spec, tiny_tokenizer, 64)
    began = time.perf_counter()
    again, rows_again = store_rows(spec, tiny_tokenizer, 64)
    assert time.perf_counter() - began < 2 and again.path == first.path
    assert again.meta["created"] == first.meta["created"] and rows_again.to_dict() == rows.to_dict()
    with open(path, "a") as fh:
        fh.write(json.dumps({"text": "one more document"}) + "\n")
    edited, _ = store_rows(spec, tiny_tokenizer, 64)
    assert edited.path != first.path and edited.meta["train"]["documents"] == first.meta["train"]["documents"] + 1
    assert len(list_stores()) == 2


def test_a_killed_build_is_rebuilt_not_read(tmp_path, cache, tiny_tokenizer, tok_dir):
    from lmlab.data.store import is_complete, list_stores, store_key

    path = tmp_path / "big.jsonl"
    texts = write_corpus(path, n=400)
    with open(path, "a") as fh:  # enough text that the build takes a few seconds
        for _ in range(12):
            for text in texts:
                fh.write(json.dumps({"text": text}) + "\n")
    spec = SourceSpec(kind="jsonl", path=str(path))
    script = ("import sys; from lmlab.data.tokenizer import load_tokenizer; from lmlab.recipe import SourceSpec;"
              "from lmlab.data.store import prepare_store;"
              f"prepare_store(SourceSpec(kind='jsonl', path={str(path)!r}), load_tokenizer({str(tok_dir)!r}), 0.0, 0, 1)")
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    stores = cache / "stores"
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.split(".tmp-")[0] and ".tmp-" in p.name
                                             and (p / "train.bin").exists() and (p / "train.bin").stat().st_size
                                             for p in (stores.iterdir() if stores.is_dir() else [])):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    key, _ = store_key(spec, tiny_tokenizer, 0.0, 0)
    assert any(".tmp-" in p.name for p in stores.iterdir()), "the build was not caught mid-write"
    assert not is_complete(stores / key) and list_stores() == []
    store, rows = store_rows(spec, tiny_tokenizer, 64)
    assert is_complete(store.path) and not any(".tmp-" in p.name for p in stores.iterdir())
    ids = tiny_tokenizer(texts[:3], add_special_tokens=False)["input_ids"]
    assert rows.to_dict()["input_ids"][0] == next(pack_token_lists(ids, 64, tiny_tokenizer.eos_token_id))["input_ids"]


def test_a_truncated_store_is_rebuilt(tmp_path, cache, tiny_tokenizer):
    write_corpus(tmp_path / "c.jsonl")
    spec = SourceSpec(kind="jsonl", path=str(tmp_path / "c.jsonl"))
    store, rows = store_rows(spec, tiny_tokenizer, 64)
    expected = rows.to_dict()
    with open(store.path / "train.bin", "r+b") as fh:
        fh.truncate(100)
    rebuilt, rows = store_rows(spec, tiny_tokenizer, 64)
    assert rows.to_dict() == expected and rebuilt.meta["created"] >= store.meta["created"]


def test_split_holds_out_by_document_hash_and_at_least_one_document(tmp_path, cache, tiny_tokenizer):
    from lmlab.data.split import doc_hash

    texts = write_corpus(tmp_path / "c.jsonl", n=200)
    spec = SourceSpec(kind="jsonl", path=str(tmp_path / "c.jsonl"))
    store, _ = store_rows(spec, tiny_tokenizer, 64, fraction=0.1)
    held = [i for i in range(len(texts)) if doc_hash(f"{tmp_path / 'c.jsonl'}:{i + 1}") < 0.1]
    assert store.meta["validation"]["documents"] == len(held) > 0
    expected = sum(len(x) + 1 for x in tiny_tokenizer([texts[i] for i in held], add_special_tokens=False)["input_ids"])
    assert store.meta["validation"]["tokens"] == expected
    (tmp_path / "two.jsonl").write_text('{"text": "alpha beta"}\n{"text": "gamma delta"}\n')
    tiny, _ = store_rows(SourceSpec(kind="jsonl", path=str(tmp_path / "two.jsonl")), tiny_tokenizer, 4, fraction=0.01)
    assert tiny.meta["validation"]["documents"] == 1 and tiny.meta["train"]["documents"] == 1


def test_mixed_sources_and_replay_share_are_exact_over_rows(tmp_path, cache, tiny_tokenizer):
    from lmlab.data.pretrain_data import build_packed_data, mix_replay

    write_corpus(tmp_path / "a.jsonl", n=60)
    write_corpus(tmp_path / "b.jsonl", n=30, start=200)
    data = DataConfig(train=[{"kind": "jsonl", "path": str(tmp_path / "a.jsonl"), "weight": 1},
                             {"kind": "jsonl", "path": str(tmp_path / "b.jsonl"), "weight": 3}], seq_len=64)
    train = build_packed_data(data, tiny_tokenizer, 0, 8).train
    part_of = np.searchsorted(train.offsets, train.index, side="right") - 1
    assert abs(float((part_of == 1).mean()) - 0.75) < 0.01
    for part in (0, 1):  # each source is seen whole at least once, whatever its weight
        assert set(train.index[part_of == part]) == set(range(train.offsets[part], train.offsets[part + 1]))
    domain, replay = (build_packed_data(DataConfig(train=[data.train[i]], seq_len=64), tiny_tokenizer, 0, 8).train
                      for i in (0, 1))
    domain, replay = domain.select(np.arange(100)), replay.select(np.arange(50))
    mixed, mix = mix_replay(domain, replay, 200, 0.16, 0, 64)
    assert len(mixed) == 200 and (mix.replay_rows, mix.domain_rows) == (32, 168)  # round(0.16 * 200)
    from_replay = mixed.index >= int(domain.offsets[-1])  # the replay rows' windows come after the domain's
    assert int(from_replay.sum()) == 32 and not from_replay[:168].any()
    assert set(mixed.index[:168]) == set(domain.index)  # every domain row, some twice
    assert len(set(mixed.index[168:])) == 32 and set(mixed.index[168:] - int(domain.offsets[-1])) <= set(replay.index)


def test_bad_input_names_file_line_and_field(tmp_path, cache, tiny_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(LmlabError, match=r"bad\.jsonl:2.*UTF-8"):
        store_rows(SourceSpec(kind="jsonl", path=str(bad)), tiny_tokenizer, 4)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(LmlabError, match=r"missing\.jsonl:2: text: missing field 'text'"):
        store_rows(SourceSpec(kind="jsonl", path=str(missing)), tiny_tokenizer, 4)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(LmlabError, match="no documents"):
        store_rows(SourceSpec(kind="jsonl", path=str(empty)), tiny_tokenizer, 4)
    assert not [p for p in (cache / "stores").iterdir() if p.is_dir()]  # nothing half-written is left visible


def test_a_store_built_with_another_tokenizer_is_refused(tmp_path, cache, tiny_tokenizer):
    from lmlab.data.store import open_store
    from lmlab.data.tokenizer import train_tokenizer

    write_corpus(tmp_path / "c.jsonl")
    store, _ = store_rows(SourceSpec(kind="jsonl", path=str(tmp_path / "c.jsonl")), tiny_tokenizer, 64)
    other = train_tokenizer(iter(["other words entirely"] * 50), vocab_size=300)
    with pytest.raises(LmlabError, match=r"meta\.json: tokenizer: this token store was built with another"):
        open_store(store.path, other)
    assert open_store(store.path, tiny_tokenizer).meta == store.meta


def test_large_vocabularies_use_uint32(tmp_path, cache):
    from lmlab.data.store import token_dtype

    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def test_streaming_rows_equal_store_rows(tmp_path, cache, tiny_tokenizer):
    from lmlab.data.pretrain_data import stream_columns

    texts = write_corpus(tmp_path / "c.jsonl", n=80)
    _, rows = store_rows(SourceSpec(kind="jsonl", path=str(tmp_path / "c.jsonl")), tiny_tokenizer, 50)
    streamed = list(stream_columns(({"text": t} for t in texts), tiny_tokenizer, 50))
    for key in ("input_ids", "position_ids", "labels"):
        assert [r[key].tolist() for r in streamed] == rows.to_dict()[key], key


def lmlab(*args: str):
    """`lmlab ARGS` in this process (the data commands start in well under a second; a Python start-up each
    would triple the test): exit code as `returncode`, standard output and error together as `output`."""
    from typer.testing import CliRunner

    from lmlab.cli import app

    result = CliRunner().invoke(app, list(args))
    result.returncode = result.exit_code
    return result


def test_data_commands_prepare_list_inspect_and_remove(tmp_path, cache, tok_dir):
    write_corpus(tmp_path / "c.jsonl", n=40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nstage: pretrain\ntokenizer: {{path: {tok_dir}}}\n"
                      f"data: {{train: {tmp_path / 'c.jsonl'}, seq_len: 64}}\n")
    first = lmlab("data", "prepare", str(recipe), "--num-proc", "2")
    assert first.returncode == 0, first.output
    assert "41 documents" in first.output and "chars/token" in first.output
    key = next(p.name for p in (cache / "stores").iterdir() if p.is_dir())
    listed = lmlab("data", "ls")
    assert key in listed.output and "c.jsonl" in listed.output
    shown = lmlab("data", "inspect", key, "--rows", "2", "--seq-len", "64")
    assert shown.returncode == 0 and "[document start]" in shown.output and "row 1" in shown.output
    from lmlab.data.tokenizer import save_tokenizer, train_tokenizer

    save_tokenizer(train_tokenizer(iter(["other words entirely"] * 50), vocab_size=300), tmp_path / "other")
    refused = lmlab("data", "inspect", key, "--tokenizer", str(tmp_path / "other"))
    assert refused.returncode == 2 and "built with another tokenizer" in refused.output
    with open(tmp_path / "c.jsonl", "a") as fh:
        fh.write('{"text": "fine"}\n{"body": "no text"}\n')
    bad = lmlab("data", "prepare", str(recipe))
    assert bad.returncode == 2 and "c.jsonl:43: text: missing field 'text'" in bad.output
    assert len(bad.output.strip().splitlines()) == 1 and "Traceback" not in bad.output
    assert lmlab("data", "rm", key).returncode == 0 and not (cache / "stores" / key).exists()
    assert lmlab("data", "rm", "nope").returncode == 2
