"""Recipes: YAML in, validated pydantic out; every error names file, line and key."""

import pytest

from lmlab.errors import LmlabError
from lmlab.recipe import Recipe, SourceSpec
from lmlab.loading import load_recipe


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_a_minimal_recipe(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: tiny\n"))
    assert recipe.model.arch == "llama" and recipe.model.tie_embeddings
    assert recipe.data.train[0].kind == "general"


def test_unknown_key_names_file_line_and_path(tmp_path):
    path = write(tmp_path, "name: t\nmodel:\n  hidden_size: 64\n  hiden: 3\n")
    with pytest.raises(LmlabError) as err:
        load_recipe(path)
    assert f"{path}:4" in str(err.value) and "model.hiden" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_the_value_line(tmp_path):
    path = write(tmp_path, "name: t\noptim:\n  lr: fast\n")
    with pytest.raises(LmlabError) as err:
        load_recipe(path)
    assert f"{path}:3" in str(err.value) and "optim.lr" in str(err.value)


def test_missing_data_file_is_an_error_before_compute(tmp_path):
    path = write(tmp_path, "name: t\ndata:\n  train:\n    - kind: jsonl\n      path: nope.jsonl\n")
    with pytest.raises(LmlabError) as err:
        load_recipe(path)
    assert "data.train.0" in str(err.value) and "nope.jsonl" in str(err.value)


def test_seq_len_above_model_maximum_is_rejected(tmp_path):
    path = write(tmp_path, "name: t\nmodel:\n  max_position_embeddings: 128\ndata:\n  seq_len: 256\n")
    with pytest.raises(LmlabError, match="exceeds model.max_position_embeddings"):
        load_recipe(path)


def test_overrides_set_nested_keys_with_yaml_types(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: t\n"), ["optim.lr=3e-4", "train.max_steps=7", "model.arch=qwen3"])
    assert recipe.optim.lr == 3e-4 and recipe.train.max_steps == 7 and recipe.model.arch == "qwen3"


def test_bad_override_key_is_reported(tmp_path):
    with pytest.raises(LmlabError, match="optim.lrr"):
        load_recipe(write(tmp_path, "name: t\n"), ["optim.lrr=1"])


def test_two_budgets_conflict(tmp_path):
    with pytest.raises(LmlabError, match="only one training budget"):
        load_recipe(write(tmp_path, "name: t\ntrain:\n  tokens: 1000\n  max_steps: 5\n"))


def test_source_shorthand(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    assert SourceSpec.model_validate("general").kind == "general"
    assert SourceSpec.model_validate(str(tmp_path / "a.jsonl")).kind == "jsonl"
    assert SourceSpec.model_validate("hub:org/data").path == "org/data"


def test_gqa_heads_must_divide(tmp_path):
    with pytest.raises(LmlabError, match="multiple of num_kv_heads"):
        load_recipe(write(tmp_path, "name: t\nmodel:\n  num_heads: 4\n  num_kv_heads: 3\n"))


def test_shipped_recipes_validate(tmp_path):
    from pathlib import Path

    import yaml

    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "recipes/ ships examples"
    from lmlab.pipeline import load_pipeline

    for path in recipes:  # chained recipes name the artifacts of earlier ones: stand in for them
        tree = yaml.safe_load(path.read_text())
        if "stages" in tree:  # a pipeline: every stage validates, inputs wired
            assert load_pipeline(path)[1]
            continue
        if "study" in tree:  # a study file (lmlab study): its own schema
            from lmlab.experiments.studies import load_study_file

            assert load_study_file(path).name == tree["name"]
            continue
        for block, key in (("model", "from_pretrained"), ("tokenizer", "path"), ("distill", "teacher")):
            upstream = (tree.get(block) or {}).get(key)
            if upstream:
                (tmp_path / upstream).mkdir(parents=True, exist_ok=True)
        assert isinstance(load_recipe(path), Recipe)


def test_a_budget_on_the_command_line_replaces_the_recipes(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntrain: {tokens: 100000, micro_batch_size: 2}\n")
    recipe = load_recipe(path, ["train.max_steps=20"])
    assert recipe.train.max_steps == 20 and recipe.train.tokens is None and recipe.train.micro_batch_size == 2
    assert load_recipe(path, ["train.epochs=2"]).train.epochs == 2


def test_an_unknown_key_gets_a_suggestion_or_its_lmlab_name(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\n")
    with pytest.raises(LmlabError, match=r"unknown key 'learning_rate' \(lmlab calls it optim.lr\)"):
        load_recipe(path, ["optim.learning_rate=1e-4"])
    with pytest.raises(LmlabError, match=r"unknown key 'lrr' \(did you mean optim.lr\?\)"):
        load_recipe(path, ["optim.lrr=1e-4"])
    path.write_text("name: r\ntrain:\n  micro_batch: 4\n")
    with pytest.raises(LmlabError, match=r"r.yaml:3: train.micro_batch: unknown key 'micro_batch' "
                                         r"\(did you mean train.micro_batch_size\?\)"):
        load_recipe(path)


def test_version():
    from typer.testing import CliRunner

    import lmlab
    from lmlab.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lmlab {lmlab.__version__}"
