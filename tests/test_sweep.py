"""`lmlab sweep`: coordinate descent over weight decay and epochs, every run recorded, the best kept."""

from __future__ import annotations

import json

import pytest
from lmlab.errors import LmlabError
from lmlab.experiments.sweep import run_sweep
from tests.helpers import tiny_recipe_file


def _recipe(tmp_path, **data):
    return tiny_recipe_file(tmp_path, "sw", data={"validation_fraction": 0.2, **data}, optim={"lr": 1e-2},
                            train={"max_steps": None, "epochs": 1, "micro_batch_size": 4, "eval_batches": 4})


@pytest.mark.slow  # over 25 s on 2 cores: make test-slow
def test_coordinate_descent_runs_each_configuration_once_and_keeps_the_best(tmp_path):
    path = _recipe(tmp_path)
    summary = run_sweep(path, {"optim.weight_decay": [0.1, 1.0], "train.epochs": [1, 2], "optim.lr": ["x1"]},
                        rounds=1, jobs=2)
    runs = summary["runs"]
    configs = [tuple(sorted(r["config"].items())) for r in runs]
    assert len(configs) == len(set(configs)) == 3  # base, wd=1.0, and epochs=2 from the better of the two
    losses = [r["eval_loss"] for r in runs]
    assert all(isinstance(x, float) for x in losses)
    assert summary["best"]["eval_loss"] == min(losses) or summary["runs"][0]["name"] == summary["best"]["name"]
    on_disk = json.loads((tmp_path / "runs" / "sw-sweep" / "sweep.json").read_text())
    assert on_disk["best"] == summary["best"] and (tmp_path / "runs" / "sw-sweep" / "sweep.md").is_file()


def test_a_sweep_without_validation_data_is_refused(tmp_path):
    with pytest.raises(LmlabError, match="judges runs by validation loss"):
        run_sweep(_recipe(tmp_path, validation_fraction=0.0))


def _run(losses_per_row, tokens=10.0):
    from lmlab.stats import Estimate

    rows = Estimate([x * tokens for x in losses_per_row], [tokens] * len(losses_per_row), binary=False)
    return {"eval_loss": float(rows), "rows": rows.as_dict()}


def test_a_lower_loss_inside_the_noise_of_the_rows_is_a_tie_and_the_sweep_does_not_move():
    from lmlab.experiments.sweep import beats

    incumbent = _run([3.0, 3.4, 2.6, 3.1, 2.9, 3.3, 2.7, 3.0])
    # 0.01 lower on average, but some rows better and some worse: within the noise
    noisy = _run([2.9, 3.5, 2.5, 3.2, 2.8, 3.3, 2.7, 2.94])
    assert noisy["eval_loss"] < incumbent["eval_loss"]
    assert not beats(noisy, incumbent) and not beats(incumbent, noisy)  # tied both ways
    # 0.05 lower on every row: a real improvement, though smaller than the rows' spread
    steady = _run([x - 0.05 for x in [3.0, 3.4, 2.6, 3.1, 2.9, 3.3, 2.7, 3.0]])
    assert beats(steady, incumbent) and not beats(incumbent, steady)
    assert beats({"eval_loss": 2.0}, {"eval_loss": None})  # anything beats a failed run


def _descend(loss_of, grid, start, extend, rounds=2):
    from lmlab.experiments.sweep import _key, coordinate_descent

    trained: list[str] = []

    def run(configs):
        trained.extend(_key(c) for c in configs if _key(c) not in trained)

    best = coordinate_descent(dict(start), grid, rounds, run, loss_of, lambda a, b: loss_of(a) < loss_of(b) - 1e-9,
                              extend)
    return best, trained


def test_a_ladder_whose_best_sits_at_an_end_grows_past_it_up_to_the_limit():
    # the loss falls with epochs up to 64 and with LR down to 0.25: both optima lie beyond the given ladders
    def loss(c):
        return (c["epochs"] - 64) ** 2 + 100 * (c["lr"] - 0.25) ** 2

    grid = {"epochs": [1, 2, 4, 8, 16], "lr": [0.5, 1.0, 2.0]}
    best, trained = _descend(loss, grid, {"epochs": 8, "lr": 1.0}, extend=2)
    assert best == {"epochs": 64, "lr": 0.25}  # two rungs up (32, 64), two down (0.25, 0.125; 0.25 wins)
    assert "epochs=128.0,lr=0.25" not in trained and any("lr=0.125" in k for k in trained)
    assert grid == {"epochs": [1, 2, 4, 8, 16], "lr": [0.5, 1.0, 2.0]}  # the caller's ladders are untouched
    best, trained = _descend(loss, grid, {"epochs": 8, "lr": 1.0}, extend=1)
    assert best == {"epochs": 32, "lr": 0.25}  # one rung each way is the limit
    best, trained = _descend(loss, grid, {"epochs": 8, "lr": 1.0}, extend=0)
    assert best == {"epochs": 16, "lr": 0.5}
    assert not [k for k in trained if "epochs=32" in k or "lr=0.25" in k]  # the ladders as given, nothing added


def test_a_ladder_does_not_grow_when_its_best_is_inside_or_the_next_rung_would_leave_its_kind():
    from lmlab.experiments.sweep import next_rung

    best, trained = _descend(lambda c: (c["epochs"] - 4) ** 2, {"epochs": [1, 2, 4, 8, 16]}, {"epochs": 8}, extend=3)
    assert best == {"epochs": 4} and len(trained) == 5
    # epochs best at 1: an integer ladder does not go to 0.5
    best, trained = _descend(lambda c: c["epochs"], {"epochs": [1, 2, 4]}, {"epochs": 2}, extend=3)
    assert best == {"epochs": 1} and len(trained) == 3
    # a minimum at the edge that only ties its neighbour (within the noise) is no slope to follow
    def flat(c):
        return 3.0 - 1e-12 * c["weight_decay"]

    best, trained = _descend(flat, {"weight_decay": [0.1, 0.2, 0.4]}, {"weight_decay": 0.2}, extend=3)
    assert len(trained) == 3
    assert next_rung([0.1, 0.2, 0.4], upward=True) == 0.8 and next_rung([0.1, 0.2, 0.4], upward=False) == 0.05
    assert next_rung([1, 2, 4], upward=False) is None and next_rung([4, 2, 1], upward=True) is None
    assert next_rung(["x1", "x2"], upward=True) is None and next_rung([3], upward=True) is None
