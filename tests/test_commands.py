"""The experiment and export commands through the command line, at tiny scale: export-tasks, report,
sweep and ensemble (studies run in `make test-slow`, which CI runs too)."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from lmlab.cli import app
from tests.helpers import tiny_recipe_file


def test_export_tasks_writes_every_task_lm_eval_can_read(tmp_path, base_model):
    refused = CliRunner().invoke(app, ["export-tasks", "math_id", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "needs --checkpoint" in refused.output
    result = CliRunner().invoke(app, ["export-tasks", "math_id,general_cloze", "--out", str(tmp_path / "t"),
                                      "--n", "5", "--checkpoint", str(base_model)])
    assert result.exit_code == 0, result.output
    for name in ("math_id", "general_cloze"):
        config = yaml.safe_load((tmp_path / "t" / f"lmlab_{name}.yaml").read_text())
        items = (tmp_path / "t" / f"{name}.jsonl").read_text().splitlines()
        assert config["task"] == f"lmlab_{name}" and len(items) == 5
    assert f"lm_eval --model hf --model_args pretrained={base_model}" in result.output
    assert "lmlab_math_id" in result.output and "--apply_chat_template" not in result.output


def test_report_command_writes_markdown_and_plots_of_a_run(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "final").mkdir(parents=True)
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "tokens_seen": 64 * s, "learning_rate": 1e-3, "grad_norm": 1.0}
            for s in range(1, 8)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "final" / "lmlab.json").write_text(json.dumps({"stage": "pretrain", "metrics": {"eval_loss": 2.5}}))
    result = CliRunner().invoke(app, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert "## r" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "r_loss.png").stat().st_size > 1000


def test_sweep_command_runs_its_grid_and_names_the_best(tmp_path):
    path = tiny_recipe_file(tmp_path, "sw", data={"validation_fraction": 0.2}, optim={"lr": 1e-2},
                            train={"max_steps": None, "epochs": 1, "micro_batch_size": 4, "eval_batches": 2})
    result = CliRunner().invoke(app, ["sweep", str(path), "--grid", "optim.weight_decay=0.1,3.2", "--grid",
                                      "optim.lr=x1", "--grid", "train.epochs=1", "--rounds", "1", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "sw-sweep" / "sweep.json").read_text())
    assert len(summary["runs"]) == 2 and summary["best"]["name"] in {r["name"] for r in summary["runs"]}


def test_ensemble_command_trains_members_and_saves_a_loadable_ensemble(tmp_path):
    from lmlab.models.build import load_model
    from lmlab.models.ensemble import EnsembleCausalLM

    path = tiny_recipe_file(tmp_path, "ens")
    result = CliRunner().invoke(app, ["ensemble", str(path), "--members", "2", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    ensemble = next((tmp_path / "runs").glob("ens-ensemble/ensemble"))
    assert isinstance(load_model(ensemble), EnsembleCausalLM)


def test_pairs_command_samples_scores_and_writes_pairs(tmp_path, base_model):
    from tests.test_preference_rl import _policy_reward_model

    scorer = _policy_reward_model(tmp_path, base_model)  # continuous scores: every prompt gives a pair
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["pairs", str(base_model), "--n", "4", "-k", "2", "--scorer", str(scorer),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(pairs) == 4 and "4 pairs from 4 prompts" in result.output
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
