"""Scaling-law fits: recover known power laws, refuse bad points, Kotha et al.'s joint limit and data efficiency."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.scaling.fit import data_efficiency, fit_power_law, joint_asymptote, plot_fits

N = np.array([1e5, 3e5, 1e6, 3e6, 1e7, 3e7])
TRUE_A, TRUE_ALPHA, TRUE_E = 5.0, 0.5, 2.0


def _law(x, A=TRUE_A, alpha=TRUE_ALPHA, E=TRUE_E):
    return A / np.asarray(x, dtype=float) ** alpha + E


def test_noise_free_points_recover_the_parameters():
    fit = fit_power_law(N, _law(N), bootstrap=20)
    assert fit.E == pytest.approx(TRUE_E, rel=0.01)
    assert fit.alpha == pytest.approx(TRUE_ALPHA, rel=0.05)
    assert fit.A == pytest.approx(TRUE_A, rel=0.05)
    assert fit.rmse < 1e-9 and fit.n_points == 6
    assert fit.predict(1e9) == pytest.approx(float(_law(1e9)), rel=1e-6)


def test_bootstrap_intervals_contain_the_truth_under_small_noise():
    rng = np.random.default_rng(0)
    loss = _law(N) * (1 + 0.002 * rng.standard_normal(N.size))
    fit = fit_power_law(N, loss, bootstrap=200, seed=0)
    assert fit.E == pytest.approx(TRUE_E, rel=0.005)
    assert fit.n_bootstrap > 150
    for value, (lo, hi) in ((TRUE_A, fit.A_ci), (TRUE_ALPHA, fit.alpha_ci), (TRUE_E, fit.E_ci)):
        assert lo <= value <= hi


def test_fit_is_json_ready():
    d = fit_power_law(N, _law(N), bootstrap=0).to_dict()
    assert d["E_ci"] == [None, None] and d["n_bootstrap"] == 0
    assert set(d) >= {"A", "alpha", "E", "rmse", "n_points"}


def test_too_few_points_say_how_many_are_needed():
    with pytest.raises(LmlabError, match=r"at least 3 points.*got 2"):
        fit_power_law([1e5, 1e6], [2.1, 2.0])


def test_nan_loss_is_refused():
    loss = _law(N)
    loss[2] = math.nan
    with pytest.raises(LmlabError, match=r"loss\[2\] is nan.*finite"):
        fit_power_law(N, loss)


def test_non_positive_x_is_refused():
    x = N.copy()
    x[1] = -3e5
    with pytest.raises(LmlabError, match=r"x\[1\] = -300000 must be > 0"):
        fit_power_law(x, _law(N))


def test_length_mismatch_is_refused():
    with pytest.raises(LmlabError, match="x has 6 values but loss has 5"):
        fit_power_law(N, _law(N)[:5])


def test_joint_asymptote_takes_k_then_n_to_infinity():
    sizes, members = [1e6, 3e6, 1e7, 3e7, 1e8], [1, 2, 4, 8]
    e_n = {n: 1.5 + 3 / n ** 0.4 for n in sizes}
    losses = {n: {k: e_n[n] + 0.7 / k ** 0.8 for k in members} for n in sizes}
    joint = joint_asymptote(losses)
    assert joint.E == pytest.approx(1.5, rel=0.03)
    for n in sizes:
        assert joint.per_n[n].E == pytest.approx(e_n[n], rel=0.01)


def test_joint_asymptote_needs_three_ensemble_sizes_per_model_size():
    losses = {n: {1: 3.0, 2: 2.9, 4: 2.85} for n in (1e6, 1e7, 1e8)}
    losses[1e7] = {1: 3.0, 2: 2.9}
    with pytest.raises(LmlabError, match=r"N=1e\+07 has 2 ensemble sizes"):
        joint_asymptote(losses)


def test_data_efficiency_of_a_recipe_worth_four_times_the_data():
    tokens = np.array([1e7, 3e7, 1e8, 3e8, 1e9])
    ratio = data_efficiency(tokens, 2 + 10 / tokens ** 0.3, tokens, 2 + 10 / (4 * tokens) ** 0.3)
    assert ratio == pytest.approx(4.0, rel=0.02)


def test_data_efficiency_is_infinite_below_the_baseline_asymptote():
    tokens = np.array([1e7, 3e7, 1e8, 3e8, 1e9])
    assert data_efficiency(tokens, 2 + 10 / tokens ** 0.3, [1e8], [1.95]) == math.inf


def test_plot_fits_writes_a_png(tmp_path):
    fit = fit_power_law(N, _law(N), bootstrap=0)
    out = plot_fits({"regularized": (list(N), list(_law(N)), fit)}, tmp_path / "plots" / "fit.png",
                    xlabel="parameters N", title="synthetic")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_lmlab_fit_reads_points_fits_each_recipe_and_reports_efficiency(tmp_path):
    from typer.testing import CliRunner

    from lmlab.cli import app

    rows = ["recipe,tokens,loss"]
    for d in (1e6, 3e6, 1e7, 3e7, 1e8):
        rows.append(f"standard,{d},{2 + 10 / d ** 0.3}")
        rows.append(f"joint,{d},{2 + 10 / (4 * d) ** 0.3}")
    points = tmp_path / "points.csv"
    points.write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(app, ["fit", str(points), "--x", "tokens", "--group", "recipe", "--bootstrap", "20",
                                      "--efficiency", "standard,joint", "--out", str(tmp_path / "fit.png")])
    assert result.exit_code == 0, result.output
    assert "standard: L = " in result.output and "asymptote E = 2.0000" in result.output
    assert "data efficiency of joint over standard: 4.00x" in result.output
    assert (tmp_path / "fit.png").read_bytes()[:4] == b"\x89PNG"
    below = "\n".join(rows[:-1] + ["joint,1e8,1.95"]) + "\n"  # joint ends under standard's asymptote
    points.write_text(below)
    unbounded = CliRunner().invoke(app, ["fit", str(points), "--x", "tokens", "--group", "recipe", "--bootstrap", "0",
                                         "--efficiency", "standard,joint"])
    assert "data efficiency of joint over standard: unbounded (joint reaches a loss of 1.9500" in unbounded.output
    assert "infx" not in unbounded.output
    points.write_text("recipe,tokens,loss\nstandard,1e6,oops\n")
    bad = CliRunner().invoke(app, ["fit", str(points), "--x", "tokens"])
    assert bad.exit_code == 2 and "points.csv:2: loss: 'oops' is not a number" in bad.output
