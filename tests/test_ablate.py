"""`lmlab ablate`: grid keys resolved for stage and pipeline recipes, seeds, mean ± std, plots."""

from __future__ import annotations

import json

import pytest
import yaml

from lmlab.stats import mean_std
from lmlab.experiments.ablate import parse_grid, resolve_key, run_ablation, summarise, variants
from lmlab.errors import LmlabError
from tests.helpers import tiny_recipe_file


def test_grid_values_are_parsed_and_bad_grids_refused():
    assert parse_grid(["train.epochs=1,2,4", "optim.lr=1e-3,3e-3"]) == {"train.epochs": [1, 2, 4],
                                                                      "optim.lr": [1e-3, 3e-3]}
    with pytest.raises(LmlabError, match="must look like key=v1,v2"):
        parse_grid(["epochs"])
    with pytest.raises(LmlabError, match="has no values"):
        parse_grid(["epochs="])


def test_short_keys_resolve_for_stage_recipes_and_pipeline_stages():
    sft_recipe = {"stage": "sft"}
    pipeline = {"stages": [{"stage": "pretrain"}, {"stage": "sft"}, {"stage": "rl", "name": "grpo"}]}
    assert resolve_key("sft.epochs", sft_recipe) == "train.epochs"
    assert resolve_key("lr", sft_recipe) == "optim.lr"
    assert resolve_key("optim.weight_decay", sft_recipe) == "optim.weight_decay"
    assert resolve_key("sft.epochs", pipeline) == "stages.sft.train.epochs"
    assert resolve_key("grpo.rl.beta", pipeline) == "stages.grpo.rl.beta"


def test_variants_cross_the_grid_with_seeds():
    made = variants({"stage": "sft"}, {"sft.epochs": [1, 2]}, seeds=3, base_name="x")
    assert len(made) == 6 and made[0].name == "x-epochs1-s0" and made[-1].name == "x-epochs2-s2"
    assert made[4].overrides == ["train.epochs=2", "seed=1", "name=x-epochs2-s1"]


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)
    made = variants({}, {"lr": [1, 2]}, seeds=2, base_name="x")
    table = summarise([(made[0], {"m": 1.0}), (made[1], {"m": 3.0}), (made[2], {"m": 10.0})])
    assert table["lr=1"]["m"] == (2.0, pytest.approx(2 ** 0.5), 2) and table["lr=2"]["m"] == (10.0, 0.0, 1)


def test_pipeline_stage_overrides_select_the_stage_by_name(tmp_path):
    from lmlab.loading import apply_override

    tree = {"stages": [{"stage": "pretrain", "train": {"tokens": 5}}, {"stage": "rl", "name": "grpo"}]}
    apply_override(tree, "stages.grpo.rl.beta=0.0")
    apply_override(tree, "stages.0.train.tokens=7")
    assert tree["stages"][1]["rl"] == {"beta": 0.0} and tree["stages"][0]["train"]["tokens"] == 7
    with pytest.raises(LmlabError, match="no list item 'sft'"):
        apply_override(tree, "stages.sft.train.epochs=2")


def test_a_bad_variant_fails_before_any_run(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "output": {"dir": str(tmp_path / "runs")}}))
    with pytest.raises(LmlabError, match="train.epochs: Input should be greater than 0"):
        run_ablation(path, ["train.epochs=2,-1"], seeds=1)
    assert not (tmp_path / "runs" / "r-ablate" / "logs").exists()


@pytest.mark.slow  # over 25 s on 2 cores: make test-slow
def test_an_ablation_runs_seeds_in_parallel_and_writes_table_and_plots(tmp_path):
    path = tiny_recipe_file(tmp_path, "abl", train={"max_steps": 2})
    out = run_ablation(path, ["train.max_steps=2,4"], seeds=2, jobs=2)
    result = json.loads((out / "ablation.json").read_text())
    assert len(result["runs"]) == 4 and not result["failed"]
    loss = result["summary"]["train.max_steps=4"]["eval_loss"]
    assert loss[2] == 2 and loss[1] > 0  # two seeds, and they differ
    assert "± " in (out / "ablation.md").read_text() and (out / "ablate_eval_loss.png").stat().st_size > 1000


def test_a_forked_variant_runs_in_the_callers_directory_with_its_own_log_and_exit_status(tmp_path):
    from lmlab.experiments.processes import start_lmlab

    (tmp_path / "bad.yaml").write_text("name: r\ntrain: {epochs: -1}\n")  # relative: found from the cwd
    failing = start_lmlab(["pretrain", "bad.yaml"], tmp_path / "bad.log")
    ok = start_lmlab(["--version"], tmp_path / "ok.log")
    failing.join(120), ok.join(120)
    assert (failing.exitcode, ok.exitcode) == (2, 0)
    log = (tmp_path / "bad.log").read_text()
    assert "bad.yaml" in log and "train.epochs" in log and "Traceback" not in log
    assert (tmp_path / "ok.log").read_text().strip()


def test_with_gpus_each_variant_runs_on_its_own_gpu_and_jobs_default_to_one_per_gpu(tmp_path, monkeypatch):
    """Variants that run at the same time never share a GPU (CUDA_VISIBLE_DEVICES per variant, the least busy
    first); without GPUs they are started as before, and --jobs defaults to one per GPU."""
    import lmlab.experiments.processes as processes
    from lmlab.experiments.ablate import Variant, run_variants

    class Running:
        """Ends at its second poll: two variants are always in flight together."""

        def __init__(self, env):
            self.env, self.polls = env, 0

        @property
        def exitcode(self):
            self.polls += 1
            return 0 if self.polls > 2 else None

        def join(self):
            pass

    started, in_flight = [], []

    def start(args, log, env=None):
        process = Running(env)
        in_flight[:] = [p for p in in_flight if p.polls <= 2]
        assert env["CUDA_VISIBLE_DEVICES"] not in {p.env["CUDA_VISIBLE_DEVICES"] for p in in_flight}
        in_flight.append(process)
        started.append(env["CUDA_VISIBLE_DEVICES"])
        return process

    monkeypatch.setattr(processes, "start_lmlab", start)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert processes.visible_gpus() == ["2", "5"] and processes.default_jobs() == 2
    todo = [Variant(f"v{i}", {}, 0, []) for i in range(5)]
    assert run_variants(tmp_path / "r.yaml", ["pretrain"], todo, tmp_path / "out", jobs=2) == []
    assert sorted(set(started)) == ["2", "5"] and len(started) == 5
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert processes.visible_gpus() == [] and processes.default_jobs() >= 1
