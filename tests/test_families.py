"""Other families' checkpoints: lmlab finds where their turns end and writes it where transformers and
vLLM look (the generation config), so a saved model stops at the end of its answer."""

from __future__ import annotations

import pytest
import torch

from tests.families import FAMILIES, family_checkpoint, family_tokenizer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_end_of_turn_is_found_from_the_template(family):
    from lmlab.data.tokenizer import end_of_turn_ids

    tokenizer = family_tokenizer(family)
    ids = end_of_turn_ids(tokenizer)
    expected = [tokenizer.convert_tokens_to_ids(t) for t in (FAMILIES[family]["eos"], FAMILIES[family]["end_of_turn"])]
    assert ids == list(dict.fromkeys(expected))


def test_lmlab_tokenizer_ends_turns_at_im_end(tiny_tokenizer):
    from lmlab.data.tokenizer import end_of_turn_ids

    assert tiny_tokenizer.convert_ids_to_tokens(end_of_turn_ids(tiny_tokenizer)) == ["<|endoftext|>", "<|im_end|>"]


def overfit_one_chat(model, tokenizer, steps: int = 200):
    """Teach the model one exchange followed by another turn, so that after its answer it would go on
    writing unless something stops it at the end-of-turn token."""
    chat = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 4 + 4?"}, {"role": "assistant", "content": "8"}]
    ids = torch.tensor([tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    return chat[:1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_saved_model_stops_at_the_end_of_its_turn_in_plain_transformers(tmp_path, family):
    """Saved by lmlab, the generation config lists the end-of-turn token, and plain `generate` ends
    the answer there; stopping at the end of a document alone (what lmlab used to write) runs on into
    the next turn."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from lmlab.artifacts import save_artifact

    source = family_checkpoint(family, tmp_path / "user")
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    eos, turn_end, doc_end = (tokenizer.convert_tokens_to_ids(FAMILIES[family][k])
                              for k in ("eos", "end_of_turn", "document_end"))
    model.generation_config.eos_token_id = doc_end  # as a checkpoint that lost its end-of-turn stop
    prompt = overfit_one_chat(model, tokenizer)
    save_artifact(model, tokenizer, tmp_path / "saved", {"stage": "test"})

    saved = GenerationConfig.from_pretrained(tmp_path / "saved")
    assert turn_end in saved.eos_token_id and eos in saved.eos_token_id
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    width = inputs["input_ids"].shape[1]
    stopped = reloaded.generate(**inputs, max_new_tokens=24, do_sample=False)[0, width:].tolist()
    assert stopped[-1] == turn_end and stopped.count(turn_end) == 1, tokenizer.decode(stopped)
    assert tokenizer.decode(stopped, skip_special_tokens=True).strip() == "5"
    ran_on = reloaded.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=doc_end)[0, width:].tolist()
    assert len(ran_on) > len(stopped)  # the check above can fail: without the stop, it writes the next turn


def test_lmlab_generation_reads_the_stops_from_the_checkpoint(tmp_path):
    from lmlab.evaluate.generation import stop_ids

    source = family_checkpoint("llama3", tmp_path / "user")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source)
    assert set(stop_ids(model, tokenizer)) == set(tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]))
    assert "<|im_end|>" not in tokenizer.get_vocab()  # nothing of lmlab's ChatML is assumed


def family_sft_recipe(tmp_path, family, **blocks):
    from tests.test_sft import sft_recipe

    checkpoint = family_checkpoint(family, tmp_path / family)
    return sft_recipe(tmp_path, checkpoint, name=f"sft-{family}", train={"epochs": None, "max_steps": 2},
                      data={"train": {"kind": "math", "num_examples": 40}, "seq_len": 160}, **blocks), checkpoint


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sft_keeps_the_checkpoints_template_and_labels_only_assistant_tokens(tmp_path, family):
    """The default template is the checkpoint's own: TRL's training version of it marks the assistant
    turns for the loss, and the artifact is saved with the original, unchanged."""
    from transformers import AutoTokenizer

    from lmlab.stages.sft import prepare_sft, run_sft

    recipe, checkpoint = family_sft_recipe(tmp_path, family)
    job = prepare_sft(recipe)
    batch = next(iter(job.trainer.get_train_dataloader()))
    tokenizer = job.tokenizer
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        kept = [int(i) for i, label in zip(ids, labels) if label != -100]
        text = tokenizer.decode(kept)
        assert "user" not in text and FAMILIES[family]["end_of_turn"] in text and "The answer is" in text, text
    final = run_sft(recipe)
    assert AutoTokenizer.from_pretrained(final).chat_template == AutoTokenizer.from_pretrained(checkpoint).chat_template


def test_lmlab_chatml_on_a_vocabulary_without_its_tokens_is_refused(tmp_path):
    from lmlab.errors import LmlabError
    from lmlab.stages.posttrain import prepare_tokenizer

    recipe, _ = family_sft_recipe(tmp_path, "llama3", sft={"chat_template": "chatml", "eval_math": 0})
    with pytest.raises(LmlabError, match=r"writes <\|im_start\|>, <\|im_end\|>, which this vocabulary lacks"):
        prepare_tokenizer(recipe)


def test_a_template_without_assistant_markers_that_trl_cannot_patch_trains_turn_by_turn(tmp_path):
    """A home-made ChatML that TRL does not know: the replies are found by rendering turn by turn (it used
    to be refused, leaving only the loss on every token)."""
    from transformers import AutoTokenizer

    from lmlab.stages.sft import prepare_sft

    recipe, checkpoint = family_sft_recipe(tmp_path, "qwen3")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
                               "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                               "{{ '<|im_start|>assistant\\n' }}{% endif %}")  # unknown to TRL
    tokenizer.save_pretrained(checkpoint)
    job = prepare_sft(recipe)
    assert job.data.assistant_mask == "turns"
    for ids, labels in zip(job.trainer.train_dataset["input_ids"][:4], job.trainer.train_dataset["labels"][:4]):
        text = job.tokenizer.decode([i for i, label in zip(ids, labels) if label != -100])
        assert text.endswith("<|im_end|>") and "user" not in text and "The answer is" in text, text


def test_a_hub_id_resolves_from_the_local_hf_cache_and_says_how_to_get_it_otherwise(tmp_path, monkeypatch):
    import shutil

    from lmlab.errors import LmlabError
    from lmlab.loading import validate_recipe

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-qwen3" / "snapshots" / ("a" * 40)
    shutil.copytree(family_checkpoint("qwen3", tmp_path / "user"), snapshot)
    (cache / "models--someorg--tiny-qwen3" / "refs").mkdir()
    (cache / "models--someorg--tiny-qwen3" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    recipe = validate_recipe({"name": "s", "stage": "sft", "model": {"from_pretrained": "someorg/tiny-qwen3"}})
    assert recipe.model.from_pretrained == str(snapshot)
    with pytest.raises(LmlabError, match=r"not in the local HF cache .*hf download Qwen/Qwen3-0.6B --local-dir "
                                         r"models/Qwen3-0.6B"):
        validate_recipe({"name": "s", "stage": "sft", "model": {"from_pretrained": "Qwen/Qwen3-0.6B"}})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dpo_and_grpo_on_the_familys_checkpoint_keep_its_template_and_stops(tmp_path, family):
    """DPO on given pairs, then GRPO from the DPO model, in the checkpoint's own template; each saved model
    keeps that template and stops at the family's end-of-turn token."""
    from transformers import AutoTokenizer, GenerationConfig

    from lmlab.stages.preference import run_preference
    from lmlab.stages.rl import run_rl
    from tests.test_preference_rl import post_recipe, write_pairs_file

    checkpoint = family_checkpoint(family, tmp_path / family)
    pairs = tmp_path / "pairs.jsonl"
    write_pairs_file(pairs)
    dpo = run_preference(post_recipe(tmp_path, checkpoint, "dpo", data={"train": {"kind": "jsonl", "path": str(pairs)}},
                                     train={"max_steps": 2}))
    rl = run_rl(post_recipe(tmp_path, dpo, "rl", train={"max_steps": 2},
                            rl={"num_generations": 4, "rewards": ["math_format"], "max_completion_length": 8}))
    original = AutoTokenizer.from_pretrained(checkpoint).chat_template
    turn_end = AutoTokenizer.from_pretrained(checkpoint).convert_tokens_to_ids(FAMILIES[family]["end_of_turn"])
    for final in (dpo, rl):
        assert AutoTokenizer.from_pretrained(final).chat_template == original
        assert turn_end in GenerationConfig.from_pretrained(final).eos_token_id


def test_an_architecture_the_planner_does_not_count_still_trains(tmp_path):
    """GPT-2's layout is outside the planner's formula, so `lmlab plan` refuses it by name; training it
    (here CPT, LoRA SFT) works, with no MFU figure instead of a wrong one."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmlab.loading import validate_recipe
    from lmlab.stages.pretrain import run_pretrain
    from lmlab.stages.sft import run_sft
    from tests.test_sft import sft_recipe

    tokenizer = family_tokenizer("qwen3")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    cpt = validate_recipe({"name": "gpt2-cpt", "stage": "cpt", "model": {"from_pretrained": str(tmp_path / "gpt2")},
                           "data": {"train": {"kind": "math", "num_examples": 200}, "seq_len": 64,
                                    "validation_fraction": 0.05},
                           "train": {"max_steps": 2, "micro_batch_size": 2, "save_every": 100, "eval_every": 100},
                           "output": {"dir": str(tmp_path / "runs")}})
    assert (run_pretrain(cpt) / "model.safetensors").is_file()
    lora = sft_recipe(tmp_path, tmp_path / "gpt2", name="gpt2-lora", lora={"enabled": True, "r": 4},
                      train={"epochs": None, "max_steps": 2}, data={"train": {"kind": "math", "num_examples": 20},
                                                                    "seq_len": 160})
    assert (run_sft(lora) / "adapter_config.json").is_file()
