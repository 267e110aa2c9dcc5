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
