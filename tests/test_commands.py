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


def test_sweep_command_runs_its_grid_names_the_best_and_the_ties(tmp_path):
    """The default suite's twin of the slow coordinate-descent test (tests/test_sweep.py): two runs, one move
    at most, through the command."""
    path = tiny_recipe_file(tmp_path, "sw", data={"validation_fraction": 0.2, "train": {"kind": "general", "limit": 12}},
                            optim={"lr": 1e-2},
                            train={"max_steps": None, "epochs": 1, "micro_batch_size": 4, "eval_batches": 2})
    result = CliRunner().invoke(app, ["sweep", str(path), "--grid", "optim.weight_decay=0.1,3.2", "--grid",
                                      "optim.lr=x1", "--grid", "train.epochs=1", "--rounds", "1", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "runs" / "sw-sweep" / "sweep.json").read_text())
    assert len(summary["runs"]) == 2 and all(isinstance(r["eval_loss"], float) for r in summary["runs"])
    best, other = summary["best"]["name"], next(r for r in summary["runs"] if r["name"] != summary["best"]["name"])
    # the other run is either tied with the best or beaten beyond the noise, and the report says which
    text = (tmp_path / "runs" / "sw-sweep" / "sweep.md").read_text()
    assert f"{best} (best)" in text and ("(tied)" in text) == (other["name"] in summary["tied_with_best"])
    manifest = json.loads((tmp_path / "runs" / "sw-sweep" / best / "final" / "lmlab.json").read_text())
    assert len(manifest["validation_rows"]["num"]) == 8  # 2 eval batches of 4 rows, each with its own loss


def test_ensemble_command_trains_members_with_different_seeds_and_saves_a_loadable_ensemble(tmp_path):
    import torch

    from lmlab.models.build import load_model
    from lmlab.models.ensemble import EnsembleCausalLM

    path = tiny_recipe_file(tmp_path, "ens")
    one = CliRunner().invoke(app, ["ensemble", str(path), "--members", "1"])
    assert one.exit_code == 2 and "at least two members" in one.output
    result = CliRunner().invoke(app, ["ensemble", str(path), "--members", "2", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    ensemble = next((tmp_path / "runs").glob("ens-ensemble/ensemble"))
    manifest = json.loads((ensemble / "ensemble.json").read_text())
    assert len(manifest["members"]) == 2 and manifest["combine"] == "logits"
    model = load_model(ensemble)
    assert isinstance(model, EnsembleCausalLM)
    first, second = model.members
    assert not torch.equal(first.model.embed_tokens.weight, second.model.embed_tokens.weight)  # other seeds


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
