"""Tokenizers: split digits, byte fallback, ChatML with system messages and assistant masks, metrics."""

import pytest

from lmlab.data.tokenizer import (chat_template, compare_tokenizers, load_tokenizer, save_tokenizer,
                                  tokenizer_metrics, train_tokenizer)
from lmlab.errors import LmlabError

MESSAGES = [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]


def _sized_texts(n, size, consumed=None):
    """n texts of exactly `size` ASCII bytes, recording which were read."""
    for i in range(n):
        if consumed is not None:
            consumed.append(i)
        yield (f"text number {i} is here. " * size)[:size]


def test_digits_are_split_one_per_token(tiny_tokenizer):
    assert tiny_tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]
    assert [t for t in tiny_tokenizer.tokenize("in 2024 we") if t.isdigit()] == ["2", "0", "2", "4"]


def test_any_unicode_round_trips(tiny_tokenizer):
    text = "naïve café – 日本語 🙂 \x00 e\u0301 ‮ It's  \"x\" .\n\ttab"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def test_special_tokens_are_single_ids(tiny_tokenizer):
    for token in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(tiny_tokenizer(token, add_special_tokens=False)["input_ids"]) == 1, token
    assert tiny_tokenizer.eos_token == "<|endoftext|>" and tiny_tokenizer.pad_token == "<|pad|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.bos_token is None and tiny_tokenizer.unk_token is None
    assert tiny_tokenizer("hi")["input_ids"] == tiny_tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_think_tags_survive_skipping_special_tokens(tiny_tokenizer):
    ids = tiny_tokenizer("<think>x</think>y<|im_end|>")["input_ids"]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>y"


def test_vocabulary_has_the_asked_size():
    from lmlab.data.general import general_documents

    tok = train_tokenizer((text for _, text in general_documents(limit=50)), vocab_size=300, min_frequency=1)
    assert len(tok) == 300


def test_saved_tokenizer_loads_in_plain_transformers_with_its_chat_template(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tiny_tokenizer, tmp_path / "t")
    plain = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert plain.chat_template == chat_template("chatml")
    assert plain.get_vocab() == tiny_tokenizer.get_vocab() and plain.pad_token == "<|pad|>"
    text = plain.apply_chat_template(MESSAGES, tokenize=False)
    assert text == ("<|im_start|>system\nAnswer tersely.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n")


def test_generation_prompt_ends_with_the_assistant_header(tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_mask_covers_exactly_the_assistant_replies(tiny_tokenizer):
    chat = MESSAGES + [{"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "It is 6."}]
    out = tiny_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    assert [tiny_tokenizer.decode(r) for r in runs + ([current] if current else [])] == ["4<|im_end|>",
                                                                                      "It is 6.<|im_end|>"]


def test_think_template_inserts_an_empty_block_when_thinking_is_off(tiny_tokenizer):
    template = chat_template("chatml_think")
    off = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, enable_thinking=False, chat_template=template)
    on = tiny_tokenizer.apply_chat_template(MESSAGES, tokenize=False, enable_thinking=True, chat_template=template)
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True,
                                                enable_thinking=False, chat_template=template)
    assert "<|im_start|>system\nAnswer tersely.<|im_end|>" in off
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")
    assert "<think>" not in on
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_think_template_renders_reasoning_and_masks_it_as_assistant(tiny_tokenizer):
    chat = MESSAGES[:2] + [{"role": "assistant", "content": "4", "reasoning_content": "two and two"}]
    out = tiny_tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                             chat_template=chat_template("chatml_think"))
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tiny_tokenizer.decode(kept) == "<think>\ntwo and two\n</think>\n\n4<|im_end|>"


def test_unknown_chat_template_names_the_shipped_ones():
    with pytest.raises(LmlabError, match="chatml, chatml_think"):
        chat_template("llama")


def _byte_level(vocab, merges):
    """A byte-level BPE from an explicit vocabulary, so every split can be checked by hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


CHARS = ["a", "b", "c", ".", "Ġ", "Ċ"]  # Ġ is a space, Ċ a newline, in byte-level notation
MERGED = _byte_level(CHARS + ["Ġa", "Ġab", "ab"], [("Ġ", "a"), ("Ġa", "b"), ("a", "b")])
TEXT = "ab  abc\ncc."  # 11 bytes; words: ab, abc, cc, .


def test_metrics_on_a_hand_checked_string():
    # tokens: [ab] [Ġ] [Ġab c] [Ċ] [c c] [.] = 8. The lone space and the newline belong to no word;
    # "abc" is charged "Ġab" and "c". Per word: ab 1, abc 2, cc 2, "." 1 -> 6 tokens over 4 words.
    assert MERGED.tokenize(TEXT) == ["ab", "Ġ", "Ġab", "c", "Ċ", "c", "c", "."]
    metrics = tokenizer_metrics(MERGED, [TEXT])
    assert metrics == {"fertility": 6 / 4, "continued_words": 2 / 4, "bytes_per_token": 11 / 8,
                       "words": 4, "tokens": 8, "bytes": 11}


def test_comparison_gives_both_metric_sets_and_their_ratios():
    # characters only: 11 tokens; per word ab 2, abc 3 (the space before it is its own token), cc 2, "." 1
    chars = _byte_level(CHARS, [])
    result = compare_tokenizers(MERGED, chars, [TEXT])
    assert result["second"]["fertility"] == 8 / 4 and result["second"]["continued_words"] == 3 / 4
    assert result["ratios"] == pytest.approx({"fertility": 1.5 / 2, "continued_words": (2 / 4) / (3 / 4),
                                              "bytes_per_token": (11 / 8) / 1, "tokens": 8 / 11})


def test_metrics_need_some_words():
    with pytest.raises(LmlabError, match="no words"):
        tokenizer_metrics(MERGED, ["", "  \n"])


def test_load_tokenizer_names_a_directory_without_one(tmp_path):
    with pytest.raises(LmlabError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_load_tokenizer_turns_a_corrupt_directory_into_a_user_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmlabError, match=str(tmp_path)):
        load_tokenizer(tmp_path)


def test_training_stops_reading_at_max_bytes():
    consumed = []
    train_tokenizer(_sized_texts(10_000, 100, consumed), vocab_size=300, min_frequency=1, max_bytes=20_000)
    assert len(consumed) == 200  # 200 texts of 100 bytes fill the budget; the 201st is never read


def test_training_refuses_a_vocabulary_without_room_for_merges():
    with pytest.raises(LmlabError, match="vocab_size"):
        train_tokenizer(_sized_texts(10, 100), vocab_size=262)


def test_training_on_no_text_is_a_user_error():
    with pytest.raises(LmlabError, match="empty"):
        train_tokenizer(iter([]), vocab_size=300)
