"""Checkpoints and reward models that cannot be loaded safely, and damaged files a resume would load: one
error line naming the file and what to do, exit 2, before anything is written; never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from lmlab.cli import app


def _copy(base_model, tmp_path, name):
    out = tmp_path / name
    shutil.copytree(base_model, out)
    return out


def _one_error(result, *expected):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], (text, errors[0])


def test_a_checkpoint_that_needs_custom_code_is_refused_without_consent(tmp_path, base_model):
    custom = _copy(base_model, tmp_path, "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "modeling.M"}}))
    _one_error(CliRunner().invoke(app, ["eval", str(custom), "--tasks", "math_id", "--n", "2"]),
               "config.json", "its own code (auto_map)")
    unknown = _copy(base_model, tmp_path, "unknown")
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "my_secret_arch"}))
    _one_error(CliRunner().invoke(app, ["chat", str(unknown)], input="hi\n"),
               "model type 'my_secret_arch'", "trust_remote_code")


def test_a_checkpoint_without_safetensors_is_refused(tmp_path, base_model):
    pickled = _copy(base_model, tmp_path, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    _one_error(CliRunner().invoke(app, ["eval", str(pickled), "--tasks", "math_id", "--n", "2"]),
               "no *.safetensors weights", "lmlab never loads pickles")


@pytest.mark.parametrize("damage", ["no safetensors", "custom code"])
def test_a_reward_model_that_cannot_load_safely_is_one_error_line(tmp_path, base_model, damage):
    from tests.test_preference_rl import _policy_reward_model

    rm = _policy_reward_model(tmp_path, base_model)
    if damage == "no safetensors":
        (rm / "model.safetensors").rename(rm / "pytorch_model.bin")
        expected = "no *.safetensors weights"
    else:
        config = json.loads((rm / "config.json").read_text())
        (rm / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
        expected = "its own code (auto_map)"
    _one_error(CliRunner().invoke(app, ["eval", str(base_model), "--tasks", "math_id", "--n", "2", "--orm", str(rm)]),
               str(rm), expected)


@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_damaged_file_in_the_checkpoint_a_resume_would_load_is_one_error_line(tmp_path, damaged):
    from tests.helpers import tiny_recipe_file

    recipe = tiny_recipe_file(tmp_path, "hurt", train={"max_steps": 4, "save_every": 2})
    assert CliRunner().invoke(app, ["pretrain", str(recipe)]).exit_code == 0
    checkpoint = tmp_path / "runs" / "hurt" / "checkpoints" / "checkpoint-4"
    target = checkpoint / damaged
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # a save cut short
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    _one_error(CliRunner().invoke(app, ["pretrain", str(recipe), "--resume"]), str(target), "--resume",
               "delete this checkpoint")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*") if p.is_file()} == before
