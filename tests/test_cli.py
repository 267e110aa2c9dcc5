"""The command line: thin wrappers whose bad input ends in one clear line and exit code 2."""

from typer.testing import CliRunner

from lmlab.cli import app


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("pretrain", "plan", "tokenizer"):
        assert command in result.output


def test_bad_recipe_is_one_line_with_exit_2(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\ntrain:\n  micro_batch_size: -1\n")
    result = CliRunner().invoke(app, ["pretrain", str(recipe)])
    assert result.exit_code == 2
    assert f"{recipe}:3: train.micro_batch_size" in result.output and "Traceback" not in result.output


def test_tokenizer_train_then_eval_against_another(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ntokenizer:\n  vocab_size: 400\n  max_train_bytes: 200000\n"
                      "data:\n  train: {kind: general, limit: 100}\n")
    runner = CliRunner()
    for out, size in (("a", 400), ("b", 600)):
        result = runner.invoke(app, ["tokenizer", "train", str(recipe), "--out", str(tmp_path / out),
                                     "--set", f"tokenizer.vocab_size={size}"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["tokenizer", "eval", str(tmp_path / "a"), "--against", str(tmp_path / "b"),
                                 "--docs", "20"])
    assert result.exit_code == 0, result.output
    assert "fertility" in result.output and "bytes_per_token" in result.output
