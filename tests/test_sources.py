"""Data sources: every kind loads to `text` + `doc_id`, and bad input names file, line and field."""

import json

import pytest

from lmlab.data.sources import load_source, mix_sources, split_validation
from lmlab.errors import LmlabError
from lmlab.recipe import SourceSpec


def spec(**kw):
    return SourceSpec(**kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_file_directory_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "b.md").write_text("beta")
    assert load_source(spec(kind="text", path=str(tmp_path / "d" / "a.txt")))["text"] == ["alpha"]
    assert load_source(spec(kind="text", path=str(tmp_path / "d")))["text"] == ["alpha", "beta"]
    assert load_source(spec(kind="text", path=str(tmp_path / "d" / "*.md")))["text"] == ["beta"]


def test_jsonl_with_ids_by_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    ds = load_source(spec(kind="jsonl", path=str(path)))
    assert ds["text"] == ["one", "two"] and ds["doc_id"] == [f"{path}:1", f"{path}:2"]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(LmlabError, match=r"bad\.jsonl:3: malformed JSON"):
        load_source(spec(kind="jsonl", path=str(path)))


def test_missing_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, {"body": "y"}])
    with pytest.raises(LmlabError, match=r"a\.jsonl:2: text: missing field 'text'"):
        load_source(spec(kind="jsonl", path=str(path)))


def test_empty_source_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(LmlabError, match="no documents"):
        load_source(spec(kind="jsonl", path=str(path)))


def test_parquet_and_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["x", "y", "z"]}), path)
    ds = load_source(spec(kind="parquet", path=str(path), field="content"))
    assert ds["text"] == ["x", "y", "z"] and len(set(ds["doc_id"])) == 3
    with pytest.raises(LmlabError, match="missing column 'text'"):
        load_source(spec(kind="parquet", path=str(path)))


def test_save_to_disk_directory_and_split(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"]}),
                 "valid": Dataset.from_dict({"text": ["c"]})}).save_to_disk(tmp_path / "dd")
    assert load_source(spec(kind="disk", path=str(tmp_path / "dd")))["text"] == ["a", "b"]
    assert load_source(spec(kind="disk", path=str(tmp_path / "dd"), split="valid"))["text"] == ["c"]


def test_general_and_math_formats():
    general = load_source(spec(kind="general", limit=5))
    assert len(general) == 5 and all(general["text"])
    text = load_source(spec(kind="math", num_examples=10))
    assert text[0]["text"].startswith("Question:")
    chat = load_source(spec(kind="math", num_examples=10, format="chat"))
    assert chat[0]["messages"][-1]["role"] == "assistant"
    prompt = load_source(spec(kind="math", split="ood", num_examples=10, format="prompt"))
    assert isinstance(prompt[0]["answer"], int)


def test_hub_is_a_clear_error_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LmlabError, match="hub is unreachable"):
        load_source(spec(kind="hub", path="org/some-data"))


def test_streaming_yields_the_same_documents(tmp_path):
    from datasets import IterableDataset

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(20)])
    streamed = load_source(spec(kind="jsonl", path=str(path)), streaming=True)
    assert isinstance(streamed, IterableDataset)
    assert [r["text"] for r in streamed] == load_source(spec(kind="jsonl", path=str(path)))["text"]


def test_validation_split_is_deterministic_and_order_independent(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"doc {i}"} for i in range(400)])
    ds = load_source(spec(kind="jsonl", path=str(path)))
    _, val = split_validation(ds, 0.1)
    _, val_shuffled = split_validation(ds.shuffle(seed=3), 0.1)
    _, val_streamed = split_validation(load_source(spec(kind="jsonl", path=str(path)), streaming=True), 0.1)
    ids = set(val["doc_id"])
    assert 10 < len(ids) < 80
    assert ids == set(val_shuffled["doc_id"]) == {r["doc_id"] for r in val_streamed}


def test_small_sources_still_get_a_validation_document(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    train, val = split_validation(load_source(spec(kind="jsonl", path=str(path))), 0.01)
    assert len(val) == 1 and len(train) == 2


def test_mixing_by_weight():
    a = load_source(spec(kind="math", num_examples=300))
    b = load_source(spec(kind="math", split="ood", num_examples=300))
    mixed = mix_sources([a, b], [3.0, 1.0], seed=0)
    ids = mixed["doc_id"][:200]
    share_a = sum(i.startswith("math-id") for i in ids) / len(ids)
    assert 0.65 < share_a < 0.85
