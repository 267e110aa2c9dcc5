"""Talking to a result: `lmlab chat` (piped, so scriptable), `lmlab generate`, and LoRA adapters accepted
wherever a checkpoint is, from any working directory."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from lmlab.cli import app
from tests.families import family_checkpoint
from tests.test_families import overfit_one_chat


def taught_checkpoint(tmp_path):
    """A Llama-3-style checkpoint that answers "What is 2 + 3?" with "5" and would then write the next turn,
    saved by lmlab (so its generation config stops at <|eot_id|>)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.artifacts import save_artifact

    source = family_checkpoint("llama3", tmp_path / "user")
    tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModelForCausalLM.from_pretrained(source)
    overfit_one_chat(model, tokenizer)
    return save_artifact(model, tokenizer, tmp_path / "taught", {"stage": "test"})


def test_chat_reads_turns_from_a_pipe_answers_and_stops(tmp_path):
    checkpoint = taught_checkpoint(tmp_path)
    result = CliRunner().invoke(app, ["chat", str(checkpoint)], input="What is 2 + 3?\n")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "5"  # the answer, then the end of its turn: not the next user turn
    again = CliRunner().invoke(app, ["chat", str(checkpoint)], input="What is 2 + 3?\n/clear\nWhat is 2 + 3?\n")
    assert again.output.split() == ["5", "5"]


def test_generate_answers_a_file_of_prompts(tmp_path):
    checkpoint = taught_checkpoint(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 3?", "id": 7}) + "\n"
                       + json.dumps({"prompt": [{"role": "user", "content": "What is 2 + 3?"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["generate", str(checkpoint), "--prompts", str(prompts), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["completion"].strip() for r in rows] == ["5", "5"] and rows[0]["id"] == 7
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no prompt"}) + "\n")
    refused = CliRunner().invoke(app, ["generate", str(checkpoint), "--prompts", str(bad), "--out", str(out)])
    assert refused.exit_code == 2 and "bad.jsonl:1: prompt: needs 'prompt'" in refused.output


def test_a_lora_adapter_is_a_checkpoint_for_every_command_from_any_directory(tmp_path, base_model, monkeypatch):
    """SFT with LoRA from a base given as a relative path; then, from another directory, DPO continues
    from the adapter, a reward model is trained on it, and pairs, eval, chat and export take it."""
    from lmlab.stages.preference import run_preference
    from lmlab.stages.sft import run_sft
    from tests.test_preference_rl import post_recipe, write_pairs_file
    from tests.test_sft import sft_recipe

    work = tmp_path / "work"
    shutil.copytree(base_model, work / "base")
    monkeypatch.chdir(work)
    adapter = run_sft(sft_recipe(work, "base", lora={"enabled": True, "r": 4, "alpha": 8}, optim={"lr": 1e-2},
                                 train={"epochs": None, "max_steps": 3}))
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((work / "base").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pairs = elsewhere / "pairs.jsonl"
    write_pairs_file(pairs)
    dpo = run_preference(post_recipe(elsewhere, adapter.resolve(), "dpo",
                                     data={"train": {"kind": "jsonl", "path": str(pairs)}},
                                     train={"max_steps": 2}))
    assert (dpo / "model.safetensors").is_file()
    from lmlab.stages.rm import run_reward_model

    rm = run_reward_model(post_recipe(elsewhere, adapter.resolve(), "rm", name="rm",
                                      data={"train": {"kind": "jsonl", "path": str(pairs)}, "seq_len": 160},
                                      train={"max_steps": 2}))
    assert (rm / "model.safetensors").is_file()
    import torch
    from transformers import AutoModelForSequenceClassification

    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.stages.rm import reward_model

    body = reward_model(str(adapter.resolve()), load_tokenizer(adapter)).model.layers[0].self_attn.q_proj.weight
    plain = AutoModelForSequenceClassification.from_pretrained(work / "base", num_labels=1).model.layers[0]
    assert not torch.allclose(body, plain.self_attn.q_proj.weight)  # the adapter was merged into the body
    runner = CliRunner()
    sampled = runner.invoke(app, ["pairs", str(adapter.resolve()), "--n", "4", "-k", "2", "--scorer", "math_format",
                                  "--out", str(elsewhere / "sampled.jsonl")])
    assert sampled.exit_code == 0 and (elsewhere / "sampled.jsonl").is_file(), sampled.output
    evaluated = runner.invoke(app, ["eval", str(adapter.resolve()), "--tasks", "math_id", "--n", "4"])
    assert evaluated.exit_code == 0, evaluated.output
    chatted = runner.invoke(app, ["chat", str(adapter.resolve()), "--max-new-tokens", "8"], input="What is 2 + 3?\n")
    assert chatted.exit_code == 0, chatted.output
    exported = runner.invoke(app, ["export", str(adapter.resolve()), "--out", str(elsewhere / "merged")])
    assert exported.exit_code == 0 and (elsewhere / "merged" / "model.safetensors").is_file(), exported.output
