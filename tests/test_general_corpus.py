"""The embedded general corpus: real standard-library text, split the same way every time."""

from itertools import islice

from lmlab.data.general import MAX_CHARS, file_documents, general_documents


def test_deterministic_order_and_ids():
    first = list(islice(general_documents(), 300))
    second = list(islice(general_documents(), 300))
    assert first == second
    assert len({doc_id for doc_id, _ in first}) == 300


def test_substantial_real_text():
    docs = list(general_documents())
    assert len(docs) > 1000
    text = "".join(t for _, t in docs)
    assert len(text) > 3_000_000
    assert "Return" in text and "def " in text  # docstrings and code
    assert not any(doc_id.startswith(("test/", "idlelib/")) for doc_id, _ in docs)


def test_limit():
    assert len(list(general_documents(limit=7))) == 7


def test_documents_split_at_top_level_blocks_and_stay_bounded():
    source = "".join(f"def f{i}():\n    '''Doc {i}.'''\n" + "    x = 1\n" * 60 for i in range(20))
    docs = file_documents(source)
    assert "".join(docs) == source
    assert all(doc.startswith("def ") for doc in docs)
    assert all(len(doc) <= MAX_CHARS for doc in docs)
