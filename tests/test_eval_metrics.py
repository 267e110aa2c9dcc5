"""Evaluation arithmetic against hand-computed values: pass@k, maj@k, bits per byte, cloze normalisation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lmlab.evaluate.likelihood import OptionScore, pick, score_options, text_bits_per_byte
from lmlab.evaluate.metrics import maj_at_k, majority, pass_at_k


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0


def test_maj_at_k_votes_over_the_first_k_samples():
    answers = [3, 5, 3, None, 5, 5]
    assert maj_at_k(answers, gold=5, k=3) == 0.0  # 3 wins two votes to one
    assert maj_at_k(answers, gold=5, k=6) == 1.0  # 5 wins three to two
    assert majority([5, 3]) == 5 and majority([None, None]) is None


class FixedLogits(torch.nn.Module):
    """Every position predicts the same distribution, so log-probabilities are known by hand."""

    def __init__(self, probs):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs))
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"a": 0, "b": 1, "c": 2, " ": 3, "Q": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="Q", eos_token="Q")


def test_character_normalisation_changes_the_winner():
    model = FixedLogits([0.5, 0.25, 0.0625, 0.125, 0.0625])
    scores = score_options(model, char_tokenizer(), "Q", [" aaaa", " b"])
    # " aaaa": log .125 + 4 log .5 = -4.852 over 5 chars; " b": log .125 + log .25 = -3.466 over 2 chars
    assert scores[0].logprob == pytest.approx(math.log(0.125) + 4 * math.log(0.5), abs=1e-5)
    assert scores[1].logprob == pytest.approx(math.log(0.125) + math.log(0.25), abs=1e-5)
    assert pick(scores, "none") == 1  # unnormalised, the short option wins
    assert pick(scores, "chars") == 0


def test_token_normalisation_divides_by_token_count():
    assert OptionScore(-6.0, 3, 12).normalised("tokens") == -2.0
    assert OptionScore(-6.0, 3, 12).normalised("chars") == -0.5


def test_bits_per_byte_of_a_known_string_under_a_uniform_model():
    model = FixedLogits([0.2] * 5)  # 5 tokens, uniform: each costs log2(5) bits
    bpb = text_bits_per_byte(model, char_tokenizer(), ["abcab", "ab"])
    assert bpb == pytest.approx(math.log2(5))  # one-byte tokens, each scored after the start token
    assert bpb.num == pytest.approx([5 * math.log2(5), 2 * math.log2(5)]) and bpb.den == [5, 2]  # per document
