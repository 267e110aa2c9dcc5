"""Assistant-only loss on any chat template (lmlab.data.masks): templates in the styles of Mistral, Gemma,
Phi-3, a Llama-3-like one TRL does not know and one that adds a default system prompt train on exactly the
replies and their end-of-turn token, through LoRA and full SFT, from alpaca and sharegpt files; one that
renders earlier turns differently is refused before compute; a short SFT stops where the turn ends."""

from __future__ import annotations

import json

import pytest
import torch

from lmlab.errors import LmlabError
from tests.families import STYLES, family_checkpoint
from tests.test_sft import sft_recipe

TRAINABLE = ["mistral", "gemma", "phi3", "llama3like", "default_system"]
QA = [(f"What is {a} plus {b}?", f"{a + b}") for a, b in ((2, 3), (4, 1), (6, 2), (3, 3), (5, 4), (7, 1))]


def write_sources(tmp_path) -> tuple:
    """The same six exchanges as an alpaca JSON array and as a sharegpt JSON file."""
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": q, "output": a, "system": "Answer with a number."} for q, a in QA]))
    sharegpt = tmp_path / "sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "system", "value": "Answer with a number."},
                                                       {"from": "human", "value": q}, {"from": "gpt", "value": a}]}
                                    for q, a in QA]))
    return alpaca, sharegpt


def expected_labels(tokenizer, ids: list[int], style: str) -> list[int]:
    """Independently of lmlab.data.masks, for these one-reply records: the trained tokens are those that carry
    the text between the end of the prompt (rendered with the generation prompt) and the end of the
    end-of-turn token that follows the reply."""
    end_of_turn = STYLES[style]["end_of_turn"]
    text = tokenizer.decode(ids)
    question, answer = next((q, a) for q, a in QA if q in text)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Answer with a number."},
                                            {"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)
    end = text.index(answer + end_of_turn, len(prompt)) + len(answer + end_of_turn)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == ids  # the decoded text tokenises back to the same ids
    return [i if a < end and b > len(prompt) else -100 for i, (a, b) in zip(ids, encoded["offset_mapping"])]


@pytest.mark.parametrize("style", TRAINABLE)
def test_labels_are_the_replies_and_their_end_of_turn_token_for_any_template(tmp_path, style):
    from lmlab.stages.sft import prepare_sft

    checkpoint = family_checkpoint(style, tmp_path / style)
    alpaca, sharegpt = write_sources(tmp_path)
    for source, lora in ((alpaca, False), (sharegpt, True)):
        recipe = sft_recipe(tmp_path, checkpoint, name=f"{style}-{source.stem}",
                            data={"train": str(source), "seq_len": 96},
                            lora={"enabled": lora}, train={"epochs": None, "max_steps": 1},
                            sft={"eval_math": 0, "validation_fraction": 0.0, "early_stopping_patience": None})
        job = prepare_sft(recipe)
        assert job.data.assistant_mask == "turns"  # none of these is a template TRL ships a training version of
        rows = job.trainer.train_dataset
        assert len(rows) == len(QA)
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            assert labels == expected_labels(job.tokenizer, ids, style), job.tokenizer.decode(ids)
            assert sum(label != -100 for label in labels) >= 2  # the reply and its end of turn, at least


def test_a_template_that_renders_earlier_turns_differently_is_refused_before_compute(tmp_path):
    from lmlab.stages.posttrain import prepare_tokenizer

    checkpoint = family_checkpoint("last_turn_apart", tmp_path / "apart")
    alpaca, _ = write_sources(tmp_path)
    recipe = sft_recipe(tmp_path, checkpoint, name="apart", data={"train": str(alpaca), "seq_len": 96})
    with pytest.raises(LmlabError, match=r"not prefix-consistent: rendering the turns after turn 3 changes what it "
                                         r"rendered before \(first difference at character \d+: 'Final: One"):
        prepare_tokenizer(recipe)
    assert not recipe.run_dir.exists()
    free = recipe.model_copy(update={"sft": recipe.sft.model_copy(update={"assistant_only_loss": False})})
    assert prepare_tokenizer(free)  # trained on every token, any template is fine


@pytest.mark.parametrize("style", ["gemma", "phi3"])
def test_after_a_short_sft_plain_transformers_stops_at_the_end_of_turn(tmp_path, style):
    """Trained on replies that end with the end-of-turn token, the model learns to emit it, and the saved
    generation config stops there in plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmlab.stages.sft import run_sft

    checkpoint = family_checkpoint(style, tmp_path / style)
    alpaca, _ = write_sources(tmp_path)
    final = run_sft(sft_recipe(tmp_path, checkpoint, name=f"stop-{style}", data={"train": str(alpaca), "seq_len": 96},
                               optim={"lr": 1e-2, "warmup_ratio": 0.0}, train={"epochs": None, "max_steps": 60,
                                                                              "micro_batch_size": 6},
                               sft={"eval_math": 0, "validation_fraction": 0.0, "early_stopping_patience": None}))
    tokenizer, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final)
    messages = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": QA[0][0]}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    end_of_turn = tokenizer.convert_tokens_to_ids(STYLES[style]["end_of_turn"])
    assert end_of_turn in new and len(new) < 20, tokenizer.decode(new)  # it stopped, at the end of its turn
    assert tokenizer.decode(new[:new.index(end_of_turn)]).strip() == QA[0][1]
