"""lmlab tasks exported for lm-evaluation-harness, and an lmlab checkpoint scored by `lm_eval --model hf`."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from lmlab.errors import LmlabError
from lmlab.evaluate.lm_eval_export import export_lm_eval_tasks
from lmlab.evaluate.tasks import Task, load_task


def test_export_writes_items_and_task_configs(tmp_path, base_model):
    cloze = Task("mc", "cloze", [{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "gold": 0, "_line": 1}])
    gen = Task("sums", "generative", [{"prompt": "What is 2 + 2?", "answer": -4}])
    with pytest.raises(LmlabError, match="exporting sums needs --checkpoint"):
        export_lm_eval_tasks([cloze, gen], tmp_path / "none")
    paths = export_lm_eval_tasks([cloze, gen], tmp_path / "tasks", base_model)
    mc = yaml.safe_load(paths[0].read_text())
    assert mc["task"] == "lmlab_mc" and mc["output_type"] == "multiple_choice"
    assert mc["target_delimiter"] == "" and {m["metric"] for m in mc["metric_list"]} == {"acc", "acc_norm"}
    assert json.loads((tmp_path / "tasks" / "mc.jsonl").read_text()) == {"prompt": "2 + 2 =", "choices": [" 4", " 5"],
                                                                        "gold": 0}
    sums = yaml.safe_load(paths[1].read_text())
    assert sums["output_type"] == "generate_until" and sums["metric_list"][0]["metric"] == "exact_match"
    assert [f["name"] for f in sums["filter_list"]] == ["strict-match", "flexible-extract"]
    assert sums["generation_kwargs"]["until"] == ["<|endoftext|>", "<|im_end|>"]  # the checkpoint's stops
    record = json.loads((tmp_path / "tasks" / "sums.jsonl").read_text())
    assert record["answer"] == "-4" and record["rendered"].startswith("<|im_start|>system\n")
    assert record["rendered"].endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def answering_model(tmp_path_factory, base_model):
    """The tiny base model after a short math SFT: it writes answers in lmlab's form ("... The answer is N."),
    right or wrong, so both extractors have something to read."""
    from lmlab.stages.sft import run_sft
    from tests.test_sft import sft_recipe

    root = tmp_path_factory.mktemp("answering")
    return run_sft(sft_recipe(root, base_model, name="answering", optim={"lr": 1e-2},
                              data={"train": {"kind": "math", "num_examples": 600}, "seq_len": 160},
                              train={"epochs": None, "max_steps": 150, "micro_batch_size": 8},
                              sft={"eval_math": 0, "validation_fraction": 0.0, "early_stopping_patience": None}))


def test_lm_eval_scores_lmlab_tasks_exactly_as_lmlab(tmp_path, answering_model):
    """`lm_eval --model hf` on the exported tasks, one plain command: acc, acc_norm and both generative
    extractors equal lmlab's, item by item."""
    from lmlab.data.mathgen import DEFAULT_SYSTEM
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.generation import extract_integer, generate, render_prompts
    from lmlab.evaluate.likelihood import pick, score_options
    from lmlab.models.build import load_model

    assert importlib.util.find_spec("lm_eval") is not None, "lm-eval is part of the test extra: pip install -e '.[test]'"
    cloze, math = load_task("general_cloze", n=40), load_task("math_id", n=40)
    # contexts ending in a space, options without one: lm-eval moves the space into the option and encodes the
    # two together; encoding them apart scores other tokens
    cloze.items += [{"prompt": f"{word} is ", "choices": ["def", "return", "import"], "gold": 0}
                    for word in ("The first keyword", "Next", "A value")]
    export_lm_eval_tasks([cloze, math], tmp_path / "tasks", answering_model)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf",
                    "--model_args", f"pretrained={answering_model},dtype=float32",
                    "--include_path", str(tmp_path / "tasks"), "--tasks", "lmlab_general_cloze,lmlab_math_id",
                    "--device", "cpu", "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path / "out")],
                   check=True, env=env, timeout=900, capture_output=True)
    cloze_samples = {s["doc_id"]: s for s in _samples(tmp_path, "general_cloze", "none")}
    model, tokenizer = load_model(answering_model), load_tokenizer(answering_model)
    for i, item in enumerate(cloze.items):
        scores = score_options(model, tokenizer, item["prompt"], item["choices"])
        theirs = cloze_samples[i]
        assert theirs["acc"] == float(pick(scores, "none") == item["gold"]), i
        assert theirs["acc_norm"] == float(pick(scores, "chars") == item["gold"]), i
        # and each option's log-likelihood, not only the pick: the tokens scored are the same
        assert [float(r[0][0]) for r in theirs["resps"]] == pytest.approx([s.logprob for s in scores], abs=1e-3), i
    completions = generate(model, tokenizer, render_prompts(tokenizer, [it["prompt"] for it in math.items],
                                                            system=DEFAULT_SYSTEM))
    strict_read = flexible_read = 0
    for i, (item, (text,)) in enumerate(zip(math.items, completions)):
        for name, flexible in (("strict-match", False), ("flexible-extract", True)):
            ours = extract_integer(text, flexible=flexible)
            record = next(s for s in _samples(tmp_path, "math_id", name) if s["doc_id"] == i)
            assert record["filtered_resps"][0] == (str(ours) if ours is not None else "[invalid]"), (i, name, text)
            assert record["exact_match"] == float(ours == item["answer"]), (i, name)
        strict_read += extract_integer(text) is not None
        flexible_read += extract_integer(text, flexible=True) is not None
    assert strict_read >= 10 and flexible_read >= 20  # it compared real answers, not "[invalid]" on both sides


def _samples(tmp_path, task: str, filter_name: str) -> list[dict]:
    """lm-eval's logged samples of one exported task under one filter."""
    rows = [json.loads(line) for path in (tmp_path / "out").rglob(f"samples_lmlab_{task}_*.jsonl")
            for line in path.read_text().splitlines()]
    return [r for r in rows if r.get("filter") == filter_name]
