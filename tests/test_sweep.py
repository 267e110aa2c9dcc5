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
    assert summary["best"]["eval_loss"] == min(losses)
    on_disk = json.loads((tmp_path / "runs" / "sw-sweep" / "sweep.json").read_text())
    assert on_disk["best"] == summary["best"] and (tmp_path / "runs" / "sw-sweep" / "sweep.md").is_file()


def test_a_sweep_without_validation_data_is_refused(tmp_path):
    with pytest.raises(LmlabError, match="judges runs by validation loss"):
        run_sweep(_recipe(tmp_path, validation_fraction=0.0))
