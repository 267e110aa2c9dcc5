"""Shared fixtures: tiny tokenizers and models built from configs, never downloaded."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE trained on a slice of the embedded general corpus, saved and reloaded."""
    from lmlab.data.general import general_documents
    from lmlab.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    texts = (text for _, text in general_documents(limit=300))
    tok = train_tokenizer(texts, vocab_size=512, min_frequency=2, max_bytes=400_000)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, out)
    return load_tokenizer(out)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test writes runs/ under its own temporary directory."""
    monkeypatch.chdir(tmp_path)
