"""Preference pairs: best vs worst from scored samples, ties dropped and counted, bad pairs refused."""

from __future__ import annotations

import json

import pytest

from lmlab.data.pairs import check_pair, pairs_from_scores, preference_inputs, unpaired
from lmlab.evaluate.onpolicy import sample_pairs
from lmlab.recipe import SourceSpec
from lmlab.errors import LmlabError


def test_best_and_worst_become_a_pair_and_ties_are_dropped_and_counted():
    records = [{"prompt": "p1", "answer": 3}, {"prompt": "p2"}, {"prompt": "p3"}]
    responses = [["a", "b", "c"], ["x", "y", "z"], ["u", "v", "w"]]
    scores = [[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.2, 0.9, 0.9]]
    pairs, stats = pairs_from_scores(records, responses, scores, system="S")
    assert [p["chosen"][0]["content"] for p in pairs] == ["b", "v"]  # equal best: the first sampled wins
    assert [p["rejected"][0]["content"] for p in pairs] == ["a", "u"]
    assert pairs[0]["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "p1"}]
    assert pairs[0]["answer"] == 3 and pairs[0]["chosen_score"] == 1.0 and pairs[0]["rejected_score"] == 0.0
    assert (stats.prompts, stats.pairs, stats.ties_dropped) == (3, 2, 1)
    assert stats.mean_best == pytest.approx((1.0 + 1.0 + 0.9) / 3)
    assert stats.mean_worst == pytest.approx((0.0 + 1.0 + 0.2) / 3)


def test_identical_texts_with_different_scores_are_not_a_pair():
    pairs, stats = pairs_from_scores([{"prompt": "p"}], [["same", "same"]], [[1.0, 0.0]])
    assert pairs == [] and stats.ties_dropped == 1


def test_pairs_with_equal_chosen_and_rejected_or_missing_fields_are_refused(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(LmlabError, match=r"pairs\.jsonl:2: chosen: chosen and rejected are the same"):
        preference_inputs([SourceSpec(kind="jsonl", path=str(path))])
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(LmlabError, match=r"pairs\.jsonl:2: rejected: a preference pair needs 'rejected'"):
        preference_inputs([SourceSpec(kind="jsonl", path=str(path))])
    with pytest.raises(LmlabError, match="'chosen' must be text"):
        check_pair({"prompt": "q", "chosen": 3, "rejected": "b"}, "f", 1)
    same_messages = [{"role": "assistant", "content": "x"}]
    with pytest.raises(LmlabError, match="the same response"):
        check_pair({"prompt": "q", "chosen": same_messages, "rejected": list(same_messages)}, "f", 1)


def test_kto_rows_are_one_desirable_and_one_undesirable_per_pair():
    from datasets import Dataset

    rows = unpaired(Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"},
                                       {"prompt": "r", "chosen": "c", "rejected": "d"}]))
    assert rows.to_list() == [{"prompt": "q", "completion": "a", "label": True},
                              {"prompt": "q", "completion": "b", "label": False},
                              {"prompt": "r", "completion": "c", "label": True},
                              {"prompt": "r", "completion": "d", "label": False}]


def test_preference_inputs_tell_pairs_from_prompts_and_name_bad_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "What is 2 + 2?", "answer": 4}) + "\n")
    pairs, prompts = preference_inputs([SourceSpec(kind="jsonl", path=str(path))])
    assert pairs.to_list() == [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    assert prompts.to_list() == [{"prompt": "What is 2 + 2?", "answer": 4, "system": None}]
    assert pairs.cache_files  # a disk-backed table, not a list of the whole file
    path.write_text(json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(LmlabError, match=r"mixed\.jsonl:1: prompt:"):
        preference_inputs([SourceSpec(kind="jsonl", path=str(path))])
    _, math = preference_inputs([SourceSpec(kind="math", num_examples=5)])
    assert len(math) == 5 and all(isinstance(p["answer"], int) and p["system"] for p in math)


def test_preference_records_keep_one_type_per_field_and_are_not_read_again(tmp_path, monkeypatch):
    import lmlab.data.pairs as pairs_module

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a", "answer": 4}) + "\n" + json.dumps({"prompt": "b", "answer": "4"}) + "\n")
    with pytest.raises(LmlabError, match=r"prompts\.jsonl:2: answer: 'answer' is text here but a number at .*:1"):
        preference_inputs([SourceSpec(kind="jsonl", path=str(path))])
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": i}) + "\n" for i in range(50)))
    _, first = preference_inputs([SourceSpec(kind="jsonl", path=str(path))])
    monkeypatch.setattr(pairs_module, "_preference_records",
                        lambda *a: (_ for _ in ()).throw(LmlabError("read again")))
    _, again = preference_inputs([SourceSpec(kind="jsonl", path=str(path))])  # a resume: the cached table
    assert again.to_list() == first.to_list() and len(again) == 50
    path.write_text(path.read_text() + json.dumps({"prompt": "new", "answer": 1}) + "\n")
    with pytest.raises(LmlabError, match="read again"):  # an edited file is read again
        preference_inputs([SourceSpec(kind="jsonl", path=str(path))])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    monkeypatch.undo()
    with pytest.raises(LmlabError, match="no records"):
        preference_inputs([SourceSpec(kind="jsonl", path=str(empty))])


def test_sampled_pairs_rank_by_the_scorer(base_model):
    """On-policy sampling: K samples per prompt, scored; a length scorer makes the longest the chosen one."""
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import load_model

    model, tokenizer = load_model(base_model), load_tokenizer(base_model)
    records = [{"prompt": "What is 2 + 3?", "answer": 5}, {"prompt": "What is 7 - 1?", "answer": 6}]
    def by_length(prompts, responses, items):  # longer is better; the text breaks ties, so every prompt pairs
        return [len(r) + (sum(map(ord, r)) % 997) / 1000 for r in responses]

    pairs, stats = sample_pairs(model, tokenizer, records, by_length, samples=4, max_new_tokens=12, seed=1)
    assert stats.prompts == 2 and stats.pairs == 2 and stats.ties_dropped == 0
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert len(chosen) >= len(rejected) and chosen != rejected
        assert pair["chosen_score"] == pytest.approx(by_length(None, [chosen], None)[0])
        assert pair["chosen_score"] > pair["rejected_score"]
    again, _ = sample_pairs(model, tokenizer, records, by_length, samples=4, max_new_tokens=12, seed=1)
    assert again == pairs  # seeded: the same pairs every time


def test_a_scorer_returning_non_numbers_stops_pair_sampling(base_model):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import load_model

    bad = lambda prompts, responses, items: ["high"] * len(responses)  # noqa: E731
    with pytest.raises(LmlabError, match="not a finite number"):
        sample_pairs(load_model(base_model), load_tokenizer(base_model), [{"prompt": "q"}], bad, samples=2,
                     max_new_tokens=4)
