"""Study files: validation before compute, and a whole (tiny) data-constrained study end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from lmlab.errors import LmlabError


def _study(tmp_path, tok_dir, **changes) -> dict:
    tiny = {"num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 64}
    tree = {
        "study": "data_constrained", "name": "dc", "output": {"dir": str(tmp_path / "runs")},
        "base": {"tokenizer": {"path": str(tok_dir)},
                 "data": {"train": {"kind": "general", "limit": 200}, "validation_fraction": 0.1, "seq_len": 32,
                          "unique_tokens": 1600},
                 "optim": {"lr": 3.0e-3}, "train": {"micro_batch_size": 8, "eval_every": 1000, "eval_batches": 1,
                                                    "save_every": 1000, "log_every": 1000}},
        "models": {"a": {"hidden_size": 8, "intermediate_size": 16, **tiny},
                   "b": {"hidden_size": 16, "intermediate_size": 32, **tiny},
                   "c": {"hidden_size": 24, "intermediate_size": 48, **tiny}},
        "standard": {"epochs": [1, 2]}, "regularised": {"weight_decay": [1.0], "epochs": [2]},
        "ensemble": {"members": 3}, "distill": {"student": "a"},
        "data_scaling": {"fractions": [0.25, 0.5], "models": ["a"], "epochs": [1]}, "validation_rows": 16,
    }
    tree.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_study_file_errors_name_the_field(tmp_path, tok_dir):
    from lmlab.experiments.studies import run_study

    with pytest.raises(LmlabError, match="'z' is not one of models"):
        run_study(_study(tmp_path, tok_dir, distill={"student": "z"}))
    with pytest.raises(LmlabError, match="unknown key 'epoch'"):
        run_study(_study(tmp_path, tok_dir, standard={"epoch": [1]}))
    with pytest.raises(LmlabError, match="unknown study"):
        run_study(_study(tmp_path, tok_dir, study="nope"))


@pytest.mark.slow  # over 25 s on 2 cores: make test-slow
def test_data_constrained_study_runs_and_states_every_finding(tmp_path, tok_dir):
    from lmlab.experiments.studies import run_study

    report = run_study(_study(tmp_path, tok_dir))
    results = json.loads((report.parent / "study.json").read_text())
    assert len(results["findings"]) == 5
    for finding in results["findings"]:  # a verdict, and the numbers it was reached from
        assert isinstance(finding["reproduced"], bool) and finding["numbers"] and finding["claim"]
    assert set(results["ensembles"]["c"]) == {"1", "2", "3"}
    assert results["distilled"]["loss"] > 0 and results["data_scaling"]["tokens"] == [400, 800, 1600]
    text = report.read_text()
    assert "## Findings" in text and "standard_epochs.png" in text
    for png in ("standard_epochs.png", "loss_vs_params.png"):
        assert (report.parent / png).stat().st_size > 5000
    # averaged logits (or log-probs): by Jensen on log-sum-exp, an ensemble's loss is at most its members' mean
    for size, by_k in results["ensembles"].items():
        members = results["ensemble_members"][size]
        for k, loss in by_k.items():
            assert loss <= sum(members[:int(k)]) / int(k) + 1e-6, (size, k, loss, members)
    before = (report.parent / "runs").stat().st_mtime
    assert run_study(report.parent.parent.parent / "study.yaml") == report  # finished runs are reused
    assert (report.parent / "runs").stat().st_mtime == before


@pytest.mark.slow  # over 25 s on 2 cores: make test-slow
def test_evolm_study_runs_every_finding_on_tiny_models(tmp_path, tok_dir):
    from lmlab.experiments.studies import run_study

    tiny = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32,
            "max_position_embeddings": 128}
    tree = yaml.safe_load((__import__("pathlib").Path(__file__).parents[1] / "recipes/evolm_small.yaml").read_text())
    tree.update({
        "output": {"dir": str(tmp_path / "runs")}, "tokenizer": {"vocab_size": 400, "max_train_bytes": 200_000},
        "pretrain_scaling": {**tree["pretrain_scaling"], "model": tiny, "tokens_per_param": [1, 2, 4],
                             "cloze_items": 8, "data": {"train": {"kind": "general", "limit": 200}, "seq_len": 64},
                             "train": {"micro_batch_size": 8}},
        "seeds": 2, "eval_n": 8, "replay_ratios": [0.0, 0.16], "sft_epochs": [1, 2, 3], "rl_from_epochs": 1})
    tree["base"] = {**tree["base"], "model": tiny, "train": {"tokens": 20_000, "micro_batch_size": 8},
                    "data": {**tree["base"]["data"], "train": {"kind": "general", "limit": 200}, "seq_len": 64}}
    tree["cpt"]["train"] = {"tokens": 6_000, "micro_batch_size": 8}
    tree["cpt"]["data"].update(seq_len=64, replay={"kind": "general", "limit": 200})
    tree["sft"]["data"]["train"]["num_examples"] = 64
    tree["rl"]["data"]["train"]["num_examples"] = 4
    tree["rl"]["rl"].update(num_generations=4, max_completion_length=8)
    tree["rl"]["train"]["micro_batch_size"] = 8
    path = tmp_path / "evolm.yaml"
    path.write_text(yaml.safe_dump(tree))
    report = run_study(path)
    results = json.loads((report.parent / "evolm.json").read_text())
    assert len(results["findings"]) == 5
    for finding in results["findings"]:  # a verdict, and the numbers it was reached from
        assert isinstance(finding["reproduced"], bool) and finding["numbers"] and finding["claim"]
    assert sorted(results["pretrain_scaling"]["by_budget"]) == ["1", "2", "4"]
    assert len(results["pretrain_scaling"]["by_budget"]["4"]["general_bpb"]) == 2  # one value per seed
    assert len(results["checkpoints"]) == 2 * 3 + 2  # SFT epochs x seeds + RL x seeds
    assert "## Findings" in report.read_text() and (report.parent / "f3_sft_epochs.png").is_file()
