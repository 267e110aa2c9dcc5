"""Shared fixtures: tiny tokenizers and models built from configs, never downloaded."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# token stores built by the tests live in a cache of their own (subprocesses inherit it), never the user's
os.environ["LMLAB_CACHE"] = tempfile.mkdtemp(prefix="lmlab-test-cache-")


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


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, tiny_tokenizer):
    from lmlab.data.tokenizer import save_tokenizer

    out = tmp_path_factory.mktemp("tokdir")
    save_tokenizer(tiny_tokenizer, out)
    return out


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """A tiny model pretrained on the general corpus."""
    from lmlab.stages.pretrain import run_pretrain
    from tests.helpers import tiny_recipe

    root = tmp_path_factory.mktemp("base")
    recipe = tiny_recipe(root, None, name="base", tokenizer={"vocab_size": 400, "max_train_bytes": 300_000},
                         data={"train": {"kind": "general", "limit": 300}},
                         train={"max_steps": 60, "eval_every": 100, "save_every": 100})
    return run_pretrain(recipe)
