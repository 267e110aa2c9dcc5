"""Intervals and paired comparisons against known values (lmlab.stats), and where they are shown."""

from __future__ import annotations

import json
import pickle

import pytest

from lmlab.stats import Estimate, mcnemar_exact, paired, wilson, welch_tied


def test_wilson_intervals_match_the_textbook_values():
    assert wilson(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson(5, 10) == (pytest.approx(0.23659, abs=1e-5), pytest.approx(0.76341, abs=1e-5))
    assert wilson(10, 10) == (pytest.approx(0.72247, abs=1e-5), 1.0)
    low, high = wilson(8, 100)  # the example: 0.08 at n = 100 spans about 0.04-0.15
    assert low == pytest.approx(0.0411, abs=1e-3) and high == pytest.approx(0.1502, abs=1e-3)


def test_an_accuracy_uses_wilson_and_a_ratio_uses_the_bootstrap():
    accuracy = Estimate([1.0] * 8 + [0.0] * 92)
    assert float(accuracy) == 0.08 and accuracy.method == "wilson" and accuracy.n == 100
    assert (accuracy.low, accuracy.high) == wilson(8, 100)
    bpb = Estimate([10.0, 30.0, 20.0, 40.0], [10, 10, 10, 10], binary=False)  # bits over bytes per document
    assert float(bpb) == pytest.approx(2.5) and bpb.method == "bootstrap"
    assert 1.0 <= bpb.low < 2.5 < bpb.high <= 4.0
    again = Estimate.from_dict(json.loads(json.dumps(bpb.as_dict())))
    assert (float(again), again.low, again.high) == (float(bpb), bpb.low, bpb.high)
    assert pickle.loads(pickle.dumps(accuracy)).num == accuracy.num  # gathers across ranks keep the items
    assert json.loads(json.dumps({"a": accuracy})) == {"a": 0.08}  # and JSON metric tables see a number


def test_mcnemar_exact_on_discordant_items():
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)


def test_a_real_difference_is_distinguishable_and_identical_models_are_not():
    a = Estimate([1.0] * 100 + [0.0] * 400)
    b = Estimate([1.0] * 150 + [0.0] * 350)  # b also solves 50 items a missed
    diff = paired(a, b)
    assert diff.delta == pytest.approx(0.1) and diff.distinguishable and diff.low > 0
    assert (diff.better, diff.worse) == (50, 0) and diff.p_value < 1e-10
    same = paired(a, Estimate(list(a.num)))
    assert same.delta == 0 and not same.distinguishable
    # the same accuracies on different items: a wash of 20 gained and 20 lost is noise
    shuffled = Estimate([0.0] * 20 + [1.0] * 100 + [0.0] * 380)
    wash = paired(a, Estimate([1.0] * 80 + [0.0] * 20 + [1.0] * 20 + [0.0] * 380))
    assert wash.delta == 0 and not wash.distinguishable and wash.p_value == 1.0
    assert not paired(a, shuffled).distinguishable
    with pytest.raises(ValueError, match="same items"):
        paired(a, Estimate([1.0]))


def test_a_paired_bits_per_byte_difference_follows_the_documents():
    base = Estimate([20.0, 30.0, 25.0, 40.0, 22.0, 35.0], [10] * 6, binary=False)
    worse = Estimate([x + 1.0 for x in base.num], [10] * 6, binary=False)  # every document 0.1 bit/byte worse
    diff = paired(base, worse)
    assert diff.delta == pytest.approx(0.1) and diff.low == pytest.approx(0.1) and diff.distinguishable
    # unpaired, the documents' own spread (2.0 to 4.0) would swamp a 0.1 difference
    assert base.high - base.low > 0.5


def test_runs_of_two_configurations_within_noise_are_tied():
    assert welch_tied([1.00, 1.02, 0.98], [1.01, 0.99, 1.03])
    assert not welch_tied([1.00, 1.01, 0.99], [1.50, 1.51, 1.49])
    assert welch_tied([1.0], [2.0])  # one run each cannot be told apart


def test_the_comparison_reports_each_stage_change_with_its_interval():
    from lmlab.evaluate.compare import comparison_markdown, stage_changes

    results = {"sft": {"math_id/greedy_accuracy": Estimate([1.0] * 100 + [0.0] * 400)},
               "rl": {"math_id/greedy_accuracy": Estimate([1.0] * 150 + [0.0] * 350)},
               "rl2": {"math_id/greedy_accuracy": Estimate([1.0] * 150 + [0.0] * 350)}}
    changes = stage_changes(results)
    assert set(changes) == {"rl", "rl2"} and changes["rl"]["math_id/greedy_accuracy"].distinguishable
    text = comparison_markdown(results, changes, ["math_id/greedy_accuracy"])
    assert "math_id/greedy_accuracy (n=500)" in text and "0.200 [0." in text and "0.300 [0." in text
    assert "| rl - sft | +0.100 [+0.0" in text and "| rl2 - rl | +0.000 [+0.000, +0.000] (noise) |" in text


def test_eval_prints_intervals_as_json_and_compares_two_checkpoints(tmp_path, base_model):
    from typer.testing import CliRunner

    from lmlab.cli import app
    from tests.test_preference_rl import _adapter

    runner = CliRunner()
    one = runner.invoke(app, ["eval", str(base_model), "--tasks", "math_id,general_cloze", "--n", "12", "--json"])
    assert one.exit_code == 0, one.output
    result = json.loads(one.stdout)
    for metric in ("math_id/greedy_accuracy", "general_cloze/accuracy"):
        assert result[metric]["n"] == 12 and result[metric]["ci_low"] <= result[metric]["value"] \
            <= result[metric]["ci_high"]
    other = _adapter(tmp_path, base_model)
    two = runner.invoke(app, ["eval", str(base_model), str(other), "--tasks", "general_cloze", "--n", "12", "--json"])
    assert two.exit_code == 0, two.output
    compared = json.loads(two.stdout)
    change = compared["change"]["general_cloze/accuracy"]
    assert change["delta"] == pytest.approx(compared["b"]["general_cloze/accuracy"]["value"]
                                            - compared["a"]["general_cloze/accuracy"]["value"])
    assert change["n"] == 12 and "distinguishable" in change
