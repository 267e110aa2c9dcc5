"""Tokenizers: split digits, byte fallback, ChatML with system messages and assistant masks, metrics."""

import pytest

from lmlab.data.tokenizer import (chat_template, load_tokenizer, save_tokenizer, tokenizer_metrics,
                                  train_tokenizer)
from lmlab.errors import LmlabError

MESSAGES = [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


def test_digits_are_split_one_per_token(tiny_tokenizer):
    assert tiny_tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]


def test_any_unicode_round_trips(tiny_tokenizer):
    text = "naïve café – 日本語 🙂 \x00"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def test_special_tokens_are_single_ids(tiny_tokenizer):
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert len(tiny_tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert tiny_tokenizer.eos_token == "<|endoftext|>" and tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id


def test_saved_tokenizer_loads_in_plain_transformers_with_its_chat_template(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tiny_tokenizer, tmp_path / "t")
    plain = AutoTokenizer.from_pretrained(tmp_path / "t")
    text = plain.apply_chat_template(MESSAGES, tokenize=False)
    assert "<|im_start|>system\nAnswer tersely.<|im_end|>" in text
    prompt = plain.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_assistant_mask_covers_exactly_the_assistant_reply(tiny_tokenizer):
    out = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tiny_tokenizer.decode(kept) == "4<|im_end|>"


def test_think_template_inserts_an_empty_block_when_thinking_is_off(tiny_tokenizer):
    tiny_tokenizer.chat_template = chat_template("chatml_think")
    try:
        off = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, enable_thinking=False)
        on = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, enable_thinking=True)
    finally:
        tiny_tokenizer.chat_template = chat_template("chatml")
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>" in off
    assert "<think>" not in on and "Answer tersely." in off


def _hand_built_tokenizer():
    """Whitespace words, a vocabulary where 'ab' is one token and every other word splits per letter."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "<unk>": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_metrics_on_a_hand_checked_string():
    # words: "ab" -> [ab] (1), "abc" -> [ab, c] (2), "cc" -> [c, c] (2): 5 tokens / 3 words
    metrics = tokenizer_metrics(_hand_built_tokenizer(), ["ab abc cc"])
    assert metrics["fertility"] == pytest.approx(5 / 3)
    assert metrics["continued_words"] == pytest.approx(2 / 3)
    assert metrics["bytes_per_token"] == pytest.approx(9 / 5)


def test_load_tokenizer_names_a_directory_without_one(tmp_path):
    with pytest.raises(LmlabError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_training_stops_at_max_bytes():
    consumed = []

    def texts():
        for i in range(10_000):
            consumed.append(i)
            yield f"text number {i} " * 10

    train_tokenizer(texts(), vocab_size=300, min_frequency=1, max_bytes=20_000)
    assert len(consumed) < 200
