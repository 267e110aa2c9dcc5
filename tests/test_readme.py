"""Every command of the README's command block, run as written, top to bottom, in a fresh directory.

The directory holds a copy of `recipes/` whose models, data and budgets are shrunk to a few seconds
each (the commands themselves are not changed), and the three files the README calls the user's own:
a local checkpoint's config.json, a prompts file and a points file. A README edit that breaks a command,
or a command that stops working, fails here.

It runs in the default suite (about 150 s on 2 cores): each `lmlab` line is forked from a process that
has imported torch and transformers already, as `ablate`, `sweep` and `ensemble` start their 33 variants,
instead of paying a fresh interpreter's ~4 s of imports about 60 times.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 32,
              "max_position_embeddings": 128}
TINY_TOKENIZER = {"vocab_size": 300, "max_train_bytes": 60_000, "min_frequency": 1}
GENERAL = {"kind": "general", "limit": 40}
# the sweep and the ensemble train tiny_pretrain for a whole epoch 17 + 4 times: a few documents only
FEW_DOCUMENTS = {"kind": "general", "limit": 4}


def readme_commands(text: str) -> list[str]:
    """The `## Commands` block's lines: `\\` continuations joined, trailing comments dropped."""
    block = re.search(r"## Commands\n\n```bash\n(.*?)```", text, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line:
            commands.append(line)
    return commands


def _merge(tree: dict, changes: dict) -> dict:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _merge(tree[key], value)
        else:
            tree[key] = value
    return tree


# per recipe file: what shrinks it to seconds (the same keys a user would lower)
STAGE_CHANGES = {
    "tiny_pretrain.yaml": {"model": TINY_MODEL, "tokenizer": TINY_TOKENIZER,
                           "data": {"train": FEW_DOCUMENTS, "seq_len": 32, "validation_fraction": 0.1},
                           "train": {"tokens": 2_000, "micro_batch_size": 4, "eval_every": 100, "save_every": 10,
                                     "eval_batches": 2}},
    "math_cpt.yaml": {"data": {"train": {"num_examples": 200}, "replay": GENERAL, "seq_len": 32},
                      "train": {"tokens": 2_000, "micro_batch_size": 4, "eval_every": 10, "eval_batches": 2}},
    "math_sft.yaml": {"data": {"train": {"num_examples": 24}},
                      "train": {"epochs": 1, "micro_batch_size": 8, "eval_every": 1000},
                      "sft": {"eval_math": 8, "validation_fraction": 0.2}},
    # a tiny policy answers every prompt wrong, so its samples tie and give no pairs: train on given pairs
    "math_rm.yaml": {"data": {"train": "preferences.jsonl"}, "train": {"epochs": 1, "micro_batch_size": 4}},
    "math_dpo.yaml": {"data": {"train": "preferences.jsonl"}, "preference": {"rounds": 1}},
    "math_rl.yaml": {"data": {"train": {"num_examples": 4}}, "train": {"micro_batch_size": 8},
                     "rl": {"num_generations": 4, "max_completion_length": 8}},
    "distill_ensemble.yaml": {"model": TINY_MODEL, "data": {"train": GENERAL, "seq_len": 32},
                              "train": {"tokens": 2_000, "micro_batch_size": 4, "eval_every": 1000}},
}


def _tiny_quickstart(tree: dict) -> dict:
    by_stage = {"tokenizer": {"data": {"train": GENERAL}, "tokenizer": TINY_TOKENIZER},
                "pretrain": {"model": TINY_MODEL, "data": {"train": GENERAL, "seq_len": 32},
                             "train": STAGE_CHANGES["tiny_pretrain.yaml"]["train"]},
                "cpt": STAGE_CHANGES["math_cpt.yaml"], "sft": STAGE_CHANGES["math_sft.yaml"],
                "rl": STAGE_CHANGES["math_rl.yaml"], "eval": {"n": 8, "samples": 2}}
    for stage in tree["stages"]:
        _merge(stage, json.loads(json.dumps(by_stage[stage["stage"]])))
    return tree


def _tiny_evolm(tree: dict) -> dict:
    data = {"train": GENERAL, "seq_len": 64}
    tree.update({"tokenizer": TINY_TOKENIZER, "seeds": 1, "eval_n": 8, "replay_ratios": [0.0, 0.16],
                 "sft_epochs": [1, 2, 3], "rl_from_epochs": 1})
    _merge(tree["pretrain_scaling"], {"model": TINY_MODEL, "tokens_per_param": [1, 2, 4], "cloze_items": 8,
                                      "data": data, "train": {"micro_batch_size": 8}})
    _merge(tree["base"], {"model": TINY_MODEL, "data": data, "train": {"tokens": 4_000, "micro_batch_size": 8}})
    _merge(tree["cpt"], {"data": {"seq_len": 64, "replay": GENERAL}, "train": {"tokens": 2_000, "micro_batch_size": 8}})
    _merge(tree["chain_cpt"], {"data": {"train": {"num_examples": 200}}, "train": {"tokens": 2_000, "micro_batch_size": 8}})
    _merge(tree["sft"], {"data": {"train": {"num_examples": 32}}})
    _merge(tree["rl"], {"data": {"train": {"num_examples": 4}}, "train": {"micro_batch_size": 8},
                        "rl": {"num_generations": 4, "max_completion_length": 8}})
    tree["rl_sweep"] = {"steps": [1, 2], "variants": {"grpo": {}, "rloo": {"rl": {"algorithm": "rloo"}}},
                        "primary": "grpo"}
    tree["orm"] = None  # a model this small answers nothing right, so no pair would rank (tests/test_studies.py)
    return tree


def _tiny_data_constrained(tree: dict) -> dict:
    one_layer = {"num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "max_position_embeddings": 64}
    _merge(tree["base"], {"tokenizer": TINY_TOKENIZER,
                          "data": {"train": {"kind": "general", "limit": 200}, "validation_fraction": 0.1,
                                   "seq_len": 32, "unique_tokens": 1_600}})
    tree["models"] = {"a": {"hidden_size": 8, "intermediate_size": 16, **one_layer},
                      "b": {"hidden_size": 16, "intermediate_size": 32, **one_layer},
                      "c": {"hidden_size": 24, "intermediate_size": 48, **one_layer}}
    tree.update({"standard": {"weight_decay": 0.1, "epochs": [1, 2]},
                 "regularised": {"weight_decay": [0.1, 1.0], "lr": [1.0], "epochs": [2], "rounds": 1,
                                 "start": {"weight_decay": 1.0, "lr": 1.0, "epochs": 2}}, "distill": {"student": "a"},
                 "data_scaling": {"fractions": [0.25, 0.5], "models": ["a"], "epochs": [1]}, "validation_rows": 16})
    return tree


WHOLE_FILE_CHANGES = {"quickstart.yaml": _tiny_quickstart, "evolm_small.yaml": _tiny_evolm,
                      "data_constrained_small.yaml": _tiny_data_constrained}

QWEN3_1_7B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 2048,
              "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
              "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "torch_dtype": "bfloat16"}

def _preferences() -> str:
    from lmlab.data.mathgen import math_problems

    return "".join(json.dumps({"prompt": p.prompt, "chosen": p.solution,
                               "rejected": f"The answer is {p.answer + 1}."}) + "\n"
                   for p in math_problems("id", 24, seed=3))


# the files the README calls the user's own, and the preference pairs the shrunk RM and DPO recipes train on
USER_FILES = {
    "qwen3-1.7b/config.json": json.dumps(QWEN3_1_7B),
    "prompts.jsonl": "".join(json.dumps({"prompt": p}) + "\n" for p in ("What is 2 + 3?", "What is 7 * 6?")),
    "points.csv": "recipe,tokens,loss\n" + "".join(
        f"{recipe},{d},{e + a / d ** 0.3:.5f}\n" for recipe, a, e in (("standard", 40.0, 3.0), ("joint", 40.0, 2.6))
        for d in (1e5, 2e5, 4e5, 8e5, 1.6e6)),
    "preferences.jsonl": _preferences,
}


def shrink_recipes(dest: Path) -> None:
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        if path.name in WHOLE_FILE_CHANGES:
            tree = WHOLE_FILE_CHANGES[path.name](tree)
        elif path.name in STAGE_CHANGES:
            tree = _merge(tree, json.loads(json.dumps(STAGE_CHANGES[path.name])))
        (dest / "recipes" / path.name).write_text(yaml.safe_dump(tree, sort_keys=False))


def test_readme_commands_parse():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands[0] == "lmlab run recipes/quickstart.yaml"
    assert any("--emit plan.yaml" in c and c.startswith("lmlab plan") for c in commands)  # continuation joined
    assert all(c.startswith(("lmlab ", "echo ")) for c in commands), commands
    recipes = {m for c in commands for m in re.findall(r"recipes/[\w.]+\.yaml", c)}
    assert recipes <= {f"recipes/{p.name}" for p in (ROOT / "recipes").glob("*.yaml")}  # every named recipe exists
    assert recipes - {f"recipes/{name}" for name in (*STAGE_CHANGES, *WHOLE_FILE_CHANGES)} == set()  # each shrunk


def readme_directory(tmp_path: Path) -> list[str]:
    """Shrunk recipes and the user's own files in `tmp_path`; the README's commands, in order."""
    (tmp_path / "recipes").mkdir()
    shrink_recipes(tmp_path)
    for name, text in USER_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text() if callable(text) else text)
    return readme_commands((ROOT / "README.md").read_text())


def check_what_the_commands_made(tmp_path: Path) -> None:
    for made in ("runs/quickstart/report.md", "plan.yaml", "runs/tiny_pretrain/final/model.safetensors",
                 "runs/tiny_lr1e-3/final/model.safetensors", "tok/tokenizer.json", "merged/model.safetensors",
                 "pairs.jsonl", "runs/math_rl/final/generation_config.json", "answers.jsonl",
                 "runs/tiny_pretrain-ensemble/ensemble", "fit.png", "runs/distill_ensemble/final",
                 "runs/tiny_pretrain-sweep/sweep.md", "runs/math_sft-ablate", "runs/evolm_small/evolm.md",
                 "runs/data_constrained_small/study.md",
                 "lm_eval_tasks"):
        assert (tmp_path / made).exists(), made
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2


def run_as_written(command: str, directory: Path) -> tuple[int, str]:
    """Run one README line in `directory`: through bash and the `lmlab` script when it uses the shell
    (a pipe), else as the same `lmlab` arguments forked from a warm process (experiments.processes:
    what `ablate` runs its variants with), which skips the ~4 s of imports a fresh interpreter pays."""
    from lmlab.experiments.processes import start_lmlab

    log = directory / "command.log"
    if "|" in command or not command.startswith("lmlab "):
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=directory, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
        return done.returncode, done.stdout
    process = start_lmlab(shlex.split(command)[1:], log)
    process.join(timeout=900)
    return process.exitcode, log.read_text()


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for command in readme_directory(tmp_path):
        code, output = run_as_written(command, tmp_path)
        assert code == 0, f"{command}\n{output[-4000:]}"
    check_what_the_commands_made(tmp_path)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)
