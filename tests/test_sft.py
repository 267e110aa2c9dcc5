"""SFT: chat records, assistant-only labels, templates, packing isolation, LoRA export, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lmlab.data.chat import check_messages, from_alpaca, from_sharegpt, to_messages
from lmlab.errors import LmlabError
from tests.helpers import read_metrics, tiny_recipe

SYSTEM = "You are a careful assistant who solves arithmetic problems step by step."


def sft_recipe(tmp_path, base, name="sft", **blocks):
    defaults = dict(stage="sft", tokenizer={}, model={"from_pretrained": str(base)},
                    data={"train": {"kind": "math", "num_examples": 300}, "seq_len": 160},
                    optim={"lr": 3e-3}, train={"max_steps": None, "epochs": 1, "eval_every": 20})
    defaults["sft"] = {"eval_math": 0}
    for key, value in blocks.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            defaults[key] = {**defaults[key], **value}
        else:
            defaults[key] = value
    return tiny_recipe(tmp_path, None, name=name, **defaults)


def test_alpaca_and_sharegpt_convert_to_messages():
    assert from_alpaca({"instruction": "Add", "input": "2 and 3", "output": "5", "system": "S"}) == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"}]
    assert from_sharegpt({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}) == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert to_messages({"instruction": "x", "output": "y"})[-1]["role"] == "assistant"


def test_records_without_assistant_or_with_unknown_roles_are_rejected():
    with pytest.raises(ValueError, match="no assistant turn"):
        check_messages([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        check_messages([{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}])


def test_bad_record_names_file_and_line(tmp_path, base_model):
    from lmlab.stages.sft import prepare_sft

    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    recipe = sft_recipe(tmp_path, base_model, data={"train": {"kind": "jsonl", "path": str(path), "field": "messages"}})
    with pytest.raises(LmlabError, match=r"chat\.jsonl:2: messages: no assistant turn"):
        prepare_sft(recipe)


def test_tokenizer_without_chat_template_is_an_error(tmp_path, base_model):
    import shutil

    from lmlab.stages.sft import prepare_sft

    bare = tmp_path / "bare"
    shutil.copytree(base_model, bare)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = sft_recipe(tmp_path, bare, sft={"chat_template": "tokenizer", "eval_math": 0})
    with pytest.raises(LmlabError, match="no chat template"):
        prepare_sft(recipe)


def test_labels_cover_only_assistant_tokens_and_the_system_prompt_survives(tmp_path, base_model):
    from lmlab.stages.sft import prepare_sft

    job = prepare_sft(sft_recipe(tmp_path, base_model))
    example = job.trainer.train_dataset[0]
    batch = job.trainer.data_collator([example])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = job.tokenizer.decode(ids)
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in text
    trained = job.tokenizer.decode(ids[labels != -100])
    assistant = text.split("<|im_start|>assistant\n", 1)[1]
    assert trained == assistant.rstrip("\n") and "The answer is" in trained and trained.endswith("<|im_end|>")
    prompt_len = len(job.tokenizer(text.split("<|im_start|>assistant\n")[0] + "<|im_start|>assistant\n",
                                   add_special_tokens=False)["input_ids"])
    assert (labels[:prompt_len] == -100).all()


def test_packing_never_lets_a_sample_attend_to_another(tmp_path, base_model):
    from lmlab.stages.sft import prepare_sft

    job = prepare_sft(sft_recipe(tmp_path, base_model, data={"seq_len": 256}, sft={"packing": True, "eval_math": 0}))
    rows = job.trainer.train_dataset
    packed_row = next(rows[i] for i in range(len(rows)) if len(rows[i]["seq_lengths"]) >= 2)
    batch = job.trainer.data_collator([packed_row])
    pos = batch["position_ids"][0]
    starts = [i for i in range(len(pos)) if pos[i] == 0]
    assert len(starts) >= 2, "the row packs several samples"
    model = job.trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        second = slice(starts[1], starts[2] if len(starts) > 2 else len(pos))
        alone = model(input_ids=batch["input_ids"][:, second], use_cache=False).logits[0]
    assert torch.allclose(packed[second], alone, atol=1e-4)


def test_overlong_samples_are_counted_and_dropped_on_request(tmp_path, base_model):
    from lmlab.stages.posttrain import load_sft_data, prepare_tokenizer

    recipe = sft_recipe(tmp_path, base_model, data={"seq_len": 112}, sft={"overlong": "drop", "eval_math": 0})
    tokenizer = prepare_tokenizer(recipe)
    data = load_sft_data(recipe, tokenizer)
    assert data.dropped > 0 and data.overlong == 0  # `overlong` counts the trained records that get truncated
    assert data.examples + len(data.validation or []) == 300 - data.dropped
    kept = load_sft_data(sft_recipe(tmp_path, base_model, name="kept", data={"seq_len": 112},
                                    sft={"overlong": "truncate", "eval_math": 0}), tokenizer)
    assert kept.dropped == 0 and 0 < kept.overlong <= data.dropped  # the held-out ones are not counted
    assert kept.examples + len(kept.validation or []) == 300


def test_a_window_that_truncates_every_answer_away_is_an_error_before_training(tmp_path, base_model):
    """TRL drops samples left with no loss token after truncation; with none left, lmlab says why
    (rather than the sampler's `num_samples=0` traceback)."""
    from lmlab.stages.sft import prepare_sft

    recipe = sft_recipe(tmp_path, base_model, data={"seq_len": 24})
    with pytest.raises(LmlabError, match=r"no training record keeps an assistant token within data.seq_len=24"):
        prepare_sft(recipe)


def test_default_epochs_follow_the_size_rule_and_warn_outside_2_to_4(tmp_path, base_model):
    from lmlab.stages.sft import sft_epochs

    assert sft_epochs(sft_recipe(tmp_path, base_model, train={"epochs": None}), 5000) == 3
    with pytest.warns(UserWarning, match="outside 2-4"):
        sft_epochs(sft_recipe(tmp_path, base_model, train={"epochs": 8}), 5000)


def test_qlora_on_cpu_is_a_clear_error(tmp_path, base_model):
    from lmlab.stages.sft import prepare_sft

    for quantize in ("nf4", "int8"):
        recipe = sft_recipe(tmp_path, base_model, lora={"enabled": True, "quantize": quantize})
        with pytest.raises(LmlabError, match=f"QLoRA \\(lora.quantize: {quantize}\\) needs a CUDA GPU"):
            prepare_sft(recipe)


def test_lora_warns_on_large_alpha(tmp_path, base_model):
    from lmlab.stages.sft import prepare_sft

    with pytest.warns(UserWarning, match="alpha/lora.r"):
        prepare_sft(sft_recipe(tmp_path, base_model, lora={"enabled": True, "r": 8, "alpha": 128}))


def test_full_sft_trains_and_reports_math_accuracy(tmp_path, base_model):
    from lmlab.stages.sft import run_sft

    recipe = sft_recipe(tmp_path, base_model, sft={"eval_math": 16, "early_stopping_patience": None})
    final = run_sft(recipe)
    manifest = json.loads((final / "lmlab.json").read_text())
    assert 0 <= manifest["metrics"]["math_id/greedy_accuracy"] <= 1 and "eval_loss" in manifest["metrics"]
    assert manifest["epochs"] == 1 and manifest["steps"] > 0
    evals = [r["eval_loss"] for r in read_metrics(recipe.run_dir) if "eval_loss" in r]
    losses = [r["loss"] for r in read_metrics(recipe.run_dir) if "loss" in r and "train_loss" not in r]
    assert len(evals) >= 2 and evals[-1] < evals[0] - 0.1  # the held-out chats got easier: it learned
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2


def test_merged_lora_export_matches_the_adapter_and_loads_in_plain_transformers(tmp_path, base_model):
    from peft import PeftModel

    from lmlab.models.build import load_model
    from lmlab.artifacts import export_adapter
    from lmlab.stages.sft import run_sft

    adapter = run_sft(sft_recipe(tmp_path, base_model, lora={"enabled": True, "r": 4, "alpha": 8}, optim={"lr": 1e-2}))
    assert (adapter / "adapter_config.json").is_file()
    merged = export_adapter(adapter, tmp_path / "merged")
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(load_model(base_model), adapter).eval()(input_ids=ids).logits
        plain = load_model(merged).eval()(input_ids=ids).logits
        base = load_model(base_model).eval()(input_ids=ids).logits
    assert torch.allclose(with_adapter, plain, atol=1e-4)
    assert not torch.allclose(base, plain, atol=1e-4), "the adapter changed the model"
    code = ("import sys; sys.modules['lmlab'] = None\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(merged)!r})\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(merged)!r})\n"
            "assert '<|im_start|>system' in tok.apply_chat_template([{'role': 'system', 'content': 's'}], tokenize=False)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_early_stopping_keeps_and_reloads_the_best_checkpoint(tmp_path, base_model):
    from lmlab.stages.sft import prepare_sft

    from safetensors.torch import load_file
    from transformers import TrainerCallback

    class ScriptedValidation(TrainerCallback):
        """Replaces each evaluation's loss (before early stopping and best-model tracking read it): best at
        the second evaluation, worse after, so patience 2 must stop training at the fourth."""

        losses = iter([2.0, 1.5, 1.8, 1.9, 1.7, 1.6])

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_loss"] = next(self.losses)

    recipe = sft_recipe(tmp_path, base_model, train={"epochs": 3, "eval_every": 5, "keep_last": 1},
                        sft={"early_stopping_patience": 2, "eval_math": 0})
    job = prepare_sft(recipe)
    job.trainer.callback_handler.callbacks.insert(0, ScriptedValidation())
    job.trainer.train()
    state = job.trainer.state
    assert state.global_step == 20 < state.max_steps  # stopped early, after the fourth evaluation
    best = state.best_model_checkpoint
    assert best and ".staging" not in best and best.endswith("checkpoint-10")
    checkpoint = recipe.run_dir / "checkpoints" / "checkpoint-10"
    assert checkpoint.is_dir()  # kept although keep_last is 1
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert ".staging" not in (saved["best_model_checkpoint"] or "")
    weights = load_file(str(checkpoint / "model.safetensors"))
    for name, tensor in job.trainer.model.state_dict().items():  # the final model is the best checkpoint's
        if name in weights:
            assert torch.equal(tensor, weights[name]), name


def test_a_token_budget_sets_the_number_of_steps(tmp_path, base_model):
    from lmlab.stages.sft import prepare_sft

    recipe = sft_recipe(tmp_path, base_model, train={"epochs": None, "tokens": 4 * 160 * 7})
    assert prepare_sft(recipe).trainer.args.max_steps == 7


def test_chat_records_are_cached_on_disk_and_not_read_or_measured_again(tmp_path, base_model, monkeypatch):
    """A resume memory-maps the cached tables: no record is read or run through the chat template again."""
    import lmlab.data.chat as chat
    from lmlab.stages.posttrain import load_sft_data, prepare_tokenizer

    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {i}"},
                                                     {"role": "assistant", "content": f"{i}"}]}) + "\n"
                            for i in range(40)))
    recipe = sft_recipe(tmp_path, base_model, data={"train": str(path)})
    tokenizer = prepare_tokenizer(recipe)
    first = load_sft_data(recipe, tokenizer)
    assert first.train.cache_files and first.examples + len(first.validation) == 40  # disk-backed, not a list

    def refuse(*args, **kwargs):
        raise AssertionError("read again")

    monkeypatch.setattr(chat, "chat_records", refuse)
    monkeypatch.setattr(type(tokenizer), "apply_chat_template", refuse)
    again = load_sft_data(recipe, tokenizer)
    assert again.train["input_ids"] == first.train["input_ids"] and again.examples == first.examples
    assert again.train["assistant_masks"] == first.train["assistant_masks"]
    monkeypatch.undo()
    with open(path, "a") as fh:  # an edited file is read again
        fh.write(json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})
                 + "\n")
    edited = load_sft_data(recipe, prepare_tokenizer(recipe))
    assert edited.examples + len(edited.validation) == 41  # its own split: the new record may be held out


@pytest.mark.parametrize("packing", [False, True])
def test_sft_replay_is_an_exact_share_of_tokens_drawn_from_the_replay_source(tmp_path, base_model, packing):
    """data.replay in SFT: general windows join the chat rows as exactly replay_ratio of the trained tokens,
    every replay row comes from the general source's token store (not the math chats), and the general
    validation loss is measured before and after training."""
    from lmlab.data.pretrain_data import build_packed_data, replay_block
    from lmlab.stages.sft import prepare_sft, run_sft

    recipe = sft_recipe(tmp_path, base_model, name=f"replay{int(packing)}",
                        data={"train": {"kind": "math", "num_examples": 120}, "seq_len": 96,
                              "replay": {"kind": "general", "limit": 60}, "replay_ratio": 0.25},
                        sft={"packing": packing, "eval_math": 0}, train={"epochs": 1, "micro_batch_size": 8})
    job = prepare_sft(recipe)
    report, rows = job.replay.report, job.trainer.train_dataset
    total = sum(len(ids) for ids in rows["input_ids"])
    trained = sum(sum(label != -100 for label in labels) for labels in rows["labels"])
    assert total == report["domain_tokens"] + report["replay_tokens"]
    assert trained == report["domain_loss_tokens"] + report["replay_tokens"]
    assert abs(report["replay_tokens"] - 0.25 * trained) <= 1  # of the trained tokens, exact up to rounding
    store = build_packed_data(replay_block(recipe.data), job.tokenizer, recipe.seed, 0).train
    windows = {tuple(w) for w in store.columns(range(len(store)))["input_ids"].tolist()}
    chat_start = job.tokenizer.convert_tokens_to_ids("<|im_start|>")
    replay_rows = [ids for ids in rows["input_ids"] if chat_start not in ids]
    assert sum(len(r) for r in replay_rows) == report["replay_tokens"]
    for ids in replay_rows:  # each a general window (the last one cut to the exact count)
        assert any(w[:len(ids)] == tuple(ids) for w in windows)
        assert "The answer is" not in job.tokenizer.decode(ids)
    chat_rows = [labels for ids, labels in zip(rows["input_ids"], rows["labels"]) if chat_start in ids]
    assert all(-100 in labels for labels in chat_rows)  # prompts stay out of the loss; replay is all loss
    if packing:
        assert all(sum(n) == len(ids) for ids, n in zip(rows["input_ids"], rows["seq_lengths"]))
    if not packing:
        final = run_sft(recipe)
        manifest = json.loads((final / "lmlab.json").read_text())
        assert manifest["replay_mix"]["replay_share"] == pytest.approx(0.25, abs=0.01)
        before, after = manifest["metrics_before"]["eval_replay_loss"], manifest["metrics"]["eval_replay_loss"]
        assert 0 < before and 0 < after and before != after
