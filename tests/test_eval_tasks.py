"""Tasks as data, `lmlab eval`, and their bad-input errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lmlab.cli import app
from lmlab.errors import LmlabError
from lmlab.evaluate.tasks import general_cloze_items, load_task, run_task


def write_task(tmp_path, kind, items, **extra):
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    lines = ["name: t", f"kind: {kind}", "path: items.jsonl"] + [f"{k}: {v}" for k, v in extra.items()]
    (tmp_path / "task.yaml").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "task.yaml")


def test_gold_outside_the_choices_names_file_line_and_field(tmp_path):
    spec = write_task(tmp_path, "cloze", [{"prompt": "a", "choices": [" x", " y"], "gold": 0},
                                          {"prompt": "b", "choices": [" x", " y"], "gold": 2}])
    with pytest.raises(LmlabError, match=r"items\.jsonl:2: gold: gold 2 is not an index"):
        load_task(spec)


def test_an_empty_task_is_an_error(tmp_path):
    with pytest.raises(LmlabError, match="has no items"):
        load_task(write_task(tmp_path, "generative", []))


def test_unknown_task_and_unknown_key_are_errors(tmp_path):
    with pytest.raises(LmlabError, match="unknown task"):
        load_task("trivia")
    with pytest.raises(LmlabError, match="unknown key 'shots'"):
        load_task(write_task(tmp_path, "cloze", [{"prompt": "a", "choices": ["x", "y"], "gold": 0}], shots=5))


def test_general_cloze_items_are_deterministic_and_well_formed():
    items = general_cloze_items(30)
    assert items == general_cloze_items(30) and len(items) == 30
    for item in items:
        assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4


def test_tasks_run_on_a_checkpoint(tmp_path, base_model):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import load_model

    model, tok = load_model(base_model), load_tokenizer(base_model)
    cloze = load_task(write_task(tmp_path, "cloze", [{"prompt": "def f(x):\n", "choices": ["    return x", "zzzz"],
                                                      "gold": 0}] * 3))
    assert set(run_task(model, tok, cloze)) == {"t/accuracy"}
    generative = load_task("math_id", n=4)
    metrics = run_task(model, tok, generative, samples=2)
    assert set(metrics) == {"math_id/greedy_accuracy", "math_id/greedy_accuracy_flexible", "math_id/maj@2",
                            "math_id/pass@2", "math_id/mean@2"}
    assert all(0 <= v <= 1 for v in metrics.values())


def test_eval_cli_needs_a_tokenizer_in_the_checkpoint(tmp_path, base_model):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(base_model, bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    result = CliRunner().invoke(app, ["eval", str(bare), "--tasks", "math_id", "--n", "2"])
    assert result.exit_code == 2 and "no tokenizer" in result.output


def test_eval_cli_writes_results(tmp_path, base_model):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", str(base_model), "--tasks", "math_ood,general_cloze", "--n", "4",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert set(json.loads(out.read_text())) == {"math_ood/greedy_accuracy", "math_ood/greedy_accuracy_flexible",
                                                "general_cloze/accuracy"}


def test_eval_cli_samples_at_the_temperature_asked(tmp_path, base_model, monkeypatch):
    """RL's own objective is the reward at its training temperature: `--temperature` reaches the sampler
    (0.8 when not given), and a temperature of 0 is refused before anything loads."""
    import lmlab.evaluate.onpolicy as onpolicy

    seen, real = [], onpolicy.sampled_and_scored

    def recording(model, tokenizer, prompts, records, scorers, samples, temperature, *args, **kwargs):
        seen.append(temperature)
        return real(model, tokenizer, prompts, records, scorers, samples, temperature, *args, **kwargs)

    monkeypatch.setattr(onpolicy, "sampled_and_scored", recording)
    for extra, expected in (([], 0.8), (["--temperature", "1.3"], 1.3)):
        seen.clear()
        result = CliRunner().invoke(app, ["eval", str(base_model), "--tasks", "math_id", "--n", "4", "--samples", "2",
                                          "--orm", "math_exact", *extra])
        assert result.exit_code == 0, result.output
        assert seen and set(seen) == {expected}
    result = CliRunner().invoke(app, ["eval", str(base_model), "--tasks", "math_id", "--temperature", "0"])
    assert result.exit_code == 2 and "--temperature must be above 0" in result.output


def test_mean_at_k_is_the_share_of_right_samples_and_equals_the_verifiers_score(base_model, monkeypatch):
    """mean@k (pass@1's unbiased estimate) is the verifier's own score of the samples: a learned ORM's score is
    compared with it, so it must count exactly the samples the exact-match verifier scores 1."""
    import lmlab.evaluate.onpolicy as onpolicy
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.orm import load_scorer
    from lmlab.models.build import load_model

    task = load_task("math_id", n=3)
    right = [f"The answer is {it['answer']}." for it in task.items]
    groups = [[right[0]] * 4, [right[1], "The answer is 1000.", right[1], "no number"], ["The answer is 1000."] * 4]

    def fixed(model, tokenizer, prompts, items, scorers, samples, temperature, *args, first=0, **kwargs):
        chosen = groups[first:first + len(prompts)]
        return [(g, [scorer(prompts, g, [item] * len(g)) for scorer in scorers]) for g, item in zip(chosen, items)]

    monkeypatch.setattr(onpolicy, "sampled_and_scored", fixed)
    tok = load_tokenizer(base_model)
    metrics = run_task(load_model(base_model), tok, task, samples=4, scorer=load_scorer("math_exact", tok))
    assert metrics["math_id/mean@4"].num == [1.0, 0.5, 0.0]
    assert metrics["math_id/orm_score"].num == metrics["math_id/mean@4"].num
    assert metrics["math_id/pass@4"].num == [1.0, 1.0, 0.0] and metrics["math_id/maj@4"].num[2] == 0.0
