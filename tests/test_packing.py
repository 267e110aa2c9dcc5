"""Packing: exact-length rows, EOS separators, and no attention across documents."""

import torch

from lmlab.data.packing import IGNORE_INDEX, pack_token_lists


def test_rows_are_exact_and_positions_restart_per_document():
    rows = list(pack_token_lists([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=4, eos_id=0))
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    # the first token of a document is never predicted from the previous document
    assert rows[0]["labels"][0] == IGNORE_INDEX and rows[1]["labels"][3] == IGNORE_INDEX
    assert rows[1]["labels"] == [IGNORE_INDEX, 5, 0, IGNORE_INDEX]


def test_incomplete_tail_is_dropped():
    rows = list(pack_token_lists([[1, 2, 3, 4, 5]], seq_len=4, eos_id=0))
    assert len(rows) == 1


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def _logits(model, docs, seq_len, position_ids=True):
    row = next(pack_token_lists(docs, seq_len=seq_len, eos_id=0))
    # use_cache=False as in training (the Trainer sets it): with a KV cache, transformers
    # does not derive the packed-sequence mask from position ids
    kwargs = {"input_ids": torch.tensor([row["input_ids"]]), "use_cache": False}
    if position_ids:
        kwargs["position_ids"] = torch.tensor([row["position_ids"]])
    with torch.no_grad():
        return model(**kwargs).logits[0]


def test_changing_another_document_in_the_pack_does_not_change_a_tokens_output():
    model = _tiny_llama()
    doc_b = [11, 12, 13, 14, 15]
    a1 = _logits(model, [[1, 2, 3, 4], doc_b], seq_len=11)
    a2 = _logits(model, [[9, 8, 7, 6], doc_b], seq_len=11)
    b_alone = _logits(model, [doc_b], seq_len=6)
    assert torch.allclose(a1[5:], a2[5:], atol=1e-5)
    assert torch.allclose(a1[5:], b_alone, atol=1e-5)
    # without position ids the model attends across documents, so the outputs differ
    c1 = _logits(model, [[1, 2, 3, 4], doc_b], seq_len=11, position_ids=False)
    c2 = _logits(model, [[9, 8, 7, 6], doc_b], seq_len=11, position_ids=False)
    assert not torch.allclose(c1[5:], c2[5:], atol=1e-3)
