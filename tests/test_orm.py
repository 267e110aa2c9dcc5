"""ORM scores: verifiers and reward models, their bad input, and task evaluation during training."""

from __future__ import annotations

import json
import math

import pytest

from lmlab.errors import LmlabError
from lmlab.evaluate.orm import load_scorer, math_exact
from lmlab.evaluate.tasks import load_task, run_task
from tests.helpers import read_metrics, tiny_recipe


def test_math_verifier_scores_the_final_integer():
    items = [{"answer": 7}, {"answer": 7}, {"answer": -3}]
    # strict: the integer after the last "The answer is"; a bare "-3" is no answer, nor is "T6" a 6
    assert math_exact(["p"] * 3, ["3 + 4 = 7. The answer is 7.", "The answer is 8.", "so -3"], items) == [1.0, 0.0, 0.0]
    from lmlab.evaluate.generation import extract_integer

    assert extract_integer("T6") is None and extract_integer("T6", flexible=True) == 6
    assert extract_integer("The answer is 3. Sorry, the answer is 4.") == 3  # case matters: lmlab writes it so
    assert extract_integer("The answer is 3. The answer is -4.") == -4


def _reward_model(tmp_path, tokenizer_dir, num_labels):
    import shutil

    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels, pad_token_id=1)
    out = tmp_path / f"rm{num_labels}"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def test_reward_model_with_the_wrong_head_is_rejected(tmp_path, tok_dir):
    with pytest.raises(LmlabError, match="single-output head, this one has 2 labels"):
        load_scorer(str(_reward_model(tmp_path, tok_dir, 2)))


def test_reward_model_scores_are_numbers(tmp_path, tok_dir):
    scorer = load_scorer(str(_reward_model(tmp_path, tok_dir, 1)))
    scores = scorer(["Question: 2+2?\n", "Question: 3+3?\n"], ["4", "6"], [{}, {}])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)


def test_a_scorer_returning_non_numbers_is_an_error(base_model):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import load_model

    with pytest.raises(LmlabError, match="not a finite number"):
        run_task(load_model(base_model), load_tokenizer(base_model), load_task("math_id", 2), samples=2,
                 scorer=lambda p, r, i: ["good"] * len(r))


def test_unknown_scorer_is_an_error():
    with pytest.raises(LmlabError, match="unknown scorer"):
        load_scorer("vibes")


def test_training_logs_task_accuracy_and_orm_score(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    recipe = tiny_recipe(tmp_path, tok_dir, train={"max_steps": 6},
                         eval={"tasks": ["math_id"], "every": 3, "n": 4, "samples": 2, "orm": "math_exact"})
    run_pretrain(recipe)
    logged = [r for r in read_metrics(recipe.run_dir) if "task/math_id/orm_score" in r]
    assert [r["step"] for r in logged] == [3, 6]
    assert {"task/math_id/greedy_accuracy", "task/math_id/maj@2", "task/math_id/pass@2"} <= set(logged[0])
    for record in logged:  # finite numbers in [0, 1], each with its interval over the 4 prompts
        for metric in ("greedy_accuracy", "maj@2", "pass@2", "orm_score"):
            value = record[f"task/math_id/{metric}"]
            assert isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0, (metric, value)
            assert record[f"task/math_id/{metric}/n"] == 4
            assert record[f"task/math_id/{metric}/ci_low"] <= value <= record[f"task/math_id/{metric}/ci_high"]
    assert json.loads(json.dumps(logged)) == logged  # plain JSON, ready for the report
