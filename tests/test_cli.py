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


def test_a_stage_logged_to_a_file_keeps_every_step_on_one_line(tmp_path):
    """`lmlab pretrain ... > log.txt`: no wrapping at 80 columns, no progress-bar frames, one line per log step."""
    import subprocess
    import sys

    from tests.helpers import tiny_recipe_file

    recipe = tiny_recipe_file(tmp_path, "logged", train={"max_steps": 4, "log_every": 1, "eval_every": 2})
    log = tmp_path / "log.txt"
    with log.open("w") as fh:
        subprocess.run([sys.executable, "-m", "lmlab.cli", "pretrain", str(recipe)], cwd=tmp_path, stdout=fh,
                       stderr=subprocess.STDOUT, check=True, timeout=300)
    lines = log.read_text().splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split()[1] for line in steps if "| loss" in line] == ["1/4", "2/4", "3/4", "4/4"]
    assert all(" | " in line and line.rstrip().endswith(("s", "%")) or "val" in line for line in steps)
    budget = next(line for line in lines if line.startswith("budget:"))
    assert "unique tokens" in budget  # the long budget sentence stays on its line
    assert not any(line.startswith(("| ", "eta ", "of ")) for line in lines)  # no wrapped fragments
    assert "━" not in log.read_text()  # no progress bar drawn into the file


def test_quiet_prints_nothing_but_errors(tmp_path, monkeypatch):
    import subprocess
    import sys

    from tests.helpers import tiny_recipe_file

    recipe = tiny_recipe_file(tmp_path, "quiet", train={"max_steps": 1})
    ok = subprocess.run([sys.executable, "-m", "lmlab.cli", "--quiet", "pretrain", str(recipe)], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout == ""
    monkeypatch.setenv("LMLAB_QUIET", "0")  # --quiet sets it in this process: restored after the test
    bad = CliRunner().invoke(app, ["--quiet", "pretrain", str(recipe)])  # an error still shows, on its own
    assert bad.exit_code == 2 and "already holds a run" in bad.output
    assert [line for line in bad.output.splitlines() if line.strip()] == [bad.output.strip().splitlines()[0]]


def test_debug_shows_the_traceback_of_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\ntrain:\n  micro_batch_size: -1\n")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lmlab.cli", "--debug", "pretrain", str(recipe)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_a_full_disk_is_one_error_line_naming_the_path(tmp_path, monkeypatch):
    """The machine's errors a user can fix (full disk, read-only directory) get the same one line and exit 2."""
    import errno

    import lmlab.paths

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ntrain: {max_steps: 1}\n")

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(lmlab.paths, "write_text_atomic", full)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["pretrain", str(recipe)])
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("error:"))
    assert "recipe.yaml" in line and "the disk is full" in line and "Traceback" not in result.output


def test_dry_run_of_a_stage_shows_model_budget_memory_and_time_and_writes_nothing(tmp_path, base_model):
    from tests.helpers import tiny_recipe_file

    recipe = tiny_recipe_file(tmp_path, "dry", train={"tokens": 4096, "max_steps": None, "micro_batch_size": 2})
    result = CliRunner().invoke(app, ["pretrain", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    for expected in ("model: a fresh llama, ", "budget: 64 steps x 64 tokens = 4,096 tokens", "memory per device: ",
                     "time: about "):
        assert expected in result.output, (expected, result.output)
    assert not (tmp_path / "runs" / "dry").exists()
    assert "logits whole" in result.output  # train.tiled_loss auto: 128 tokens x 300 entries need no tiles
    tiled = CliRunner().invoke(app, ["pretrain", str(recipe), "--dry-run", "--set", "train.tiled_loss=true"])
    assert "logits in tiles" in tiled.output

    def optimizer_bytes(output: str) -> str:
        return output.split("optimizer ", 1)[1].split(",")[0]

    eight_bit = CliRunner().invoke(app, ["pretrain", str(recipe), "--dry-run", "--set", "optim.optimizer=adamw_bnb_8bit"])
    assert optimizer_bytes(eight_bit.output) != optimizer_bytes(result.output)  # the planner's 8-bit states
    sft = tiny_recipe_file(tmp_path, "dry_sft", stage="sft", model={"from_pretrained": str(base_model)},
                           tokenizer={}, data={"train": {"kind": "math", "num_examples": 100}, "seq_len": 96},
                           train={"micro_batch_size": 4, "max_steps": None})
    shown = CliRunner().invoke(app, ["sft", str(sft), "--dry-run"])
    assert shown.exit_code == 0, shown.output
    assert "data: 90 conversations, 3 epochs" in shown.output and "budget: 69 steps x 4 sequences" in shown.output
    bad = CliRunner().invoke(app, ["sft", str(sft), "--dry-run", "--set", "data.seq_len=4096"])
    assert bad.exit_code == 2 and "exceeds the model's maximum" in bad.output


def test_the_installed_command_runs_main_which_tears_the_process_group_down():
    """`lmlab` (the console script) goes through main(), not the bare app, so every process tears its
    process group down on exit (lmlab.distributed.shutdown)."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lmlab"]
    assert script.value == "lmlab.cli:main"
