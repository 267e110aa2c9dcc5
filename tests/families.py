"""Tiny checkpoints in the style of other model families, built here (nothing is downloaded): their own
special tokens, EOS conventions and published chat templates, as a user's local Llama 3 or Qwen3 would have.

- llama3: `<|begin_of_text|>` BOS, headers, turns end in `<|eot_id|>`, EOS `<|end_of_text|>`; no
  `<|im_start|>` in the vocabulary.
- qwen3: ChatML turns, EOS `<|im_end|>`, pad `<|endoftext|>`, `<think>` blocks from `reasoning_content`.
"""

from __future__ import annotations

from pathlib import Path

def published_template(name: str) -> str:
    """A family's published chat template, as the installed TRL ships it (chat_templates/NAME.jinja)."""
    from importlib import resources

    return resources.files("trl").joinpath("chat_templates", f"{name}.jinja").read_text(encoding="utf-8")


FAMILIES = {
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None, template="llama3",
                   end_of_turn="<|eot_id|>", document_end="<|end_of_text|>"),
    "qwen3": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                  extra=["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
                  bos=None, eos="<|im_end|>", pad="<|endoftext|>", template="qwen3",
                  end_of_turn="<|im_end|>", document_end="<|endoftext|>"),
}


# Templates in the style of other families, written here, none byte-identical to a template TRL knows: what a
# community fine-tune or a merge ships. Their assistant turns are found by rendering turn by turn.
SYSTEM_FIRST = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\\n\\n' %}"
                "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}")
STYLES = {
    "mistral": dict(special=["<s>", "</s>", "<unk>"], bos="<s>", eos="</s>", pad=None, end_of_turn="</s>",
                    document_end="</s>", template_text="{{ bos_token }}" + SYSTEM_FIRST + (
                        "{% for m in turns %}{% if m['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '')"
                        " + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}"
                        "{% endfor %}")),
    "gemma": dict(special=["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>",
                  eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>", document_end="<eos>",
                  template_text="{{ bos_token }}" + SYSTEM_FIRST + (
                      "{% for m in turns %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') "
                      "+ '\\n' + (system if loop.first else '') + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")),
    "phi3": dict(special=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], bos=None,
                 eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|end|>", document_end="<|endoftext|>",
                 template_text="{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
                               "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}"
                               "{{ eos_token }}{% endif %}"),
    "llama3like": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|end_of_text|>", pad=None,
                       end_of_turn="<|eot_id|>", document_end="<|end_of_text|>",
                       template_text="{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                                     "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                                     "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>"
                                     "\\n\\n' }}{% endif %}"),
    # a default system prompt when the conversation brings none
    "default_system": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|endoftext|>",
                           pad="<|endoftext|>", end_of_turn="<|im_end|>", document_end="<|endoftext|>",
                           template_text="{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are "
                                         "a helpful assistant.<|im_end|>\\n' }}{% endif %}{% for m in messages %}"
                                         "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                                         "{% endif %}"),
    # the last reply is rendered apart from the earlier ones: not prefix-consistent, so refused
    "last_turn_apart": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|endoftext|>",
                            pad="<|endoftext|>", end_of_turn="<|im_end|>", document_end="<|endoftext|>",
                            template_text="{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                                          "{% if loop.last and m['role'] == 'assistant' %}{{ 'Final: ' }}{% endif %}"
                                          "{{ m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt"
                                          " %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


def family_tokenizer(family: str, vocab_size: int = 400):
    """A byte-level BPE with the family's special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lmlab.data.general import general_documents
    from lmlab.data.mathgen import as_chat, math_problems

    spec = {**FAMILIES, **STYLES}[family]
    texts = [t for _, t in general_documents(limit=80)]
    texts += [m["content"] for p in math_problems("id", 200) for m in as_chat(p)["messages"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec["special"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if spec.get("extra"):
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["extra"]])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=spec["bos"], eos_token=spec["eos"],
                                      pad_token=spec["pad"], clean_up_tokenization_spaces=False)
    wrapped.chat_template = spec.get("template_text") or published_template(spec["template"])
    return wrapped


def family_checkpoint(family: str, out_dir: Path) -> Path:
    """A randomly initialised tiny Llama with the family's tokenizer, saved as a user's checkpoint would be
    (`save_pretrained`, with the family's own generation config), not as an lmlab artifact."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = family_tokenizer(family)
    spec = {**FAMILIES, **STYLES}[family]
    eos = [tokenizer.convert_tokens_to_ids(t) for t in dict.fromkeys([spec["end_of_turn"], spec["eos"]])]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=eos[0],
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
