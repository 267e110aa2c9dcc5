"""`lmlab report`: markdown, PNG plots, and the ORM-vs-accuracy r^2 from a run's files."""

from __future__ import annotations

import json

import pytest

from lmlab.errors import LmlabError
from lmlab.report import r_squared, write_report


def test_r_squared_hand_checked():
    assert r_squared([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert r_squared([1, 2, 3], [1, 3, 2]) == pytest.approx(0.25)  # r = 0.5
    assert r_squared([1, 1, 1], [1, 2, 3]) is None


def test_report_plots_losses_tasks_and_the_orm_correlation(tmp_path):
    run = tmp_path / "runs" / "sft"
    (run / "final").mkdir(parents=True)
    rows = [{"step": s, "loss": 3.0 - 0.1 * s, "learning_rate": 1e-3, "grad_norm": 1.0} for s in range(1, 11)]
    rows += [{"step": s, "eval_loss": 3.0 - 0.05 * s} for s in (5, 10)]
    rows += [{"step": s, "task/math_id/orm_score": o, "task/math_id/maj@4": a}
             for s, o, a in ((2, 0.1, 0.0), (4, 0.2, 0.25), (6, 0.4, 0.5), (8, 0.5, 0.5))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "final" / "lmlab.json").write_text(json.dumps({"stage": "sft", "metrics": {"eval_loss": 2.5}}))
    report = write_report(tmp_path / "runs")
    text = report.read_text()
    assert "| eval_loss | 2.5000 |" in text and "from scratch" in text and "None" not in text
    for png in ("sft_loss.png", "sft_lr.png", "sft_grad_norm.png", "sft_tasks.png", "sft_math_id_orm_vs_majat4.png"):
        assert (tmp_path / "runs" / png).stat().st_size > 1000, png
    expected = r_squared([0.1, 0.2, 0.4, 0.5], [0.0, 0.25, 0.5, 0.5])
    assert f"r² = {expected:.3f}" in text


def test_report_of_a_directory_without_runs_is_an_error(tmp_path):
    with pytest.raises(LmlabError, match="no metrics.jsonl"):
        write_report(tmp_path)


def test_a_pipeline_report_reads_in_stage_order_with_one_cross_stage_figure(tmp_path):
    from lmlab.stats import Estimate

    root = tmp_path / "runs" / "life"
    for stage in ("pretrain", "cpt", "sft"):  # alphabetically cpt < pretrain < sft
        (root / stage / "final").mkdir(parents=True)
        rows = [{"step": s, "loss": 3.0 - 0.1 * s, "tokens_seen": 512 * s} for s in range(1, 6)]
        (root / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / stage / "final" / "lmlab.json").write_text(json.dumps(
            {"stage": stage, "input_artifact": None if stage == "pretrain" else "x", "metrics": {"eval_loss": 1.0}}))
    (root / "pipeline.json").write_text(json.dumps({"pretrain": {}, "cpt": {}, "sft": {}}))
    (root / "eval").mkdir()
    results = {stage: {"estimates": {"general_bpb": Estimate([2.0 + i, 2.2 + i, 2.1 + i], [1, 1, 1]).as_dict(),
                                     "math_id/greedy_accuracy": Estimate([1.0] * i + [0.0] * (5 - i)).as_dict()}}
               for i, stage in enumerate(("pretrain", "cpt", "sft"))}
    (root / "eval" / "results.json").write_text(json.dumps(results))
    (root / "eval" / "comparison.md").write_text("| stage | general_bpb |\n")
    text = write_report(root).read_text()
    assert text.index("## pretrain") < text.index("## cpt") < text.index("## sft")  # pipeline order
    assert (root / "eval_stages.png").stat().st_size > 1000 and "![every stage](eval_stages.png)" in text
    assert (root / "cpt_loss_tokens.png").stat().st_size > 1000  # curves against tokens seen too
    assert "None" not in text
