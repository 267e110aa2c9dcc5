"""Batched generation with the KV cache, integer answer extraction, and greedy math accuracy.

Prompts are rendered with the model's chat template (generation prompt added),
left-padded into batches and decoded together, never one prompt at a time.
"""

from __future__ import annotations

import re
from typing import Any

# The answer an evaluation reads, as lm-evaluation-harness's filters read it from an exported task
# (lm_eval_export): strict is the integer right after the last "The answer is" (a completion containing `T6`
# is not an answer of 6); flexible is the last integer anywhere, reported as a metric of its own.
STRICT = re.compile(r"The answer is (-?[0-9]+)")
FLEXIBLE = re.compile(r"(-?[0-9]+)")
ITEM_SEED = 1_000_003  # a batch starting at item i of a call seeded s samples with seed s * ITEM_SEED + i


def extract_integer(text: str, flexible: bool = False) -> int | None:
    """The integer after the last "The answer is" (strict), or with `flexible` the last integer in the text."""
    found = (FLEXIBLE if flexible else STRICT).findall(text)
    return int(found[-1]) if found else None


def render_prompts(tokenizer, prompts: list[str], system: str | None = None) -> list[str]:
    """Chat-format prompts when the tokenizer has a template, plain text otherwise."""
    if not getattr(tokenizer, "chat_template", None):
        return prompts
    rendered = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def stop_ids(model, tokenizer) -> list[int]:
    """Where a completion ends: the checkpoint's generation-config EOS ids and the tokenizer's
    end of turn (the same ids an lmlab artifact writes for transformers and vLLM). `model` is a
    model, or a GenerationConfig (or None) when there is no model to ask."""
    from lmlab.data.tokenizer import end_of_turn_ids

    config = getattr(model, "generation_config", model)
    given = getattr(config, "eos_token_id", None)
    given = given if isinstance(given, list) else [given]
    return list(dict.fromkeys([*(i for i in given if isinstance(i, int) and i >= 0), *end_of_turn_ids(tokenizer)]))


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 32,
             do_sample: bool = False, temperature: float = 1.0, num_return_sequences: int = 1,
             seed: int = 0, min_new_tokens: int | None = None, first: int = 0) -> list[list[str]]:
    """`num_return_sequences` completions per prompt (text after the prompt), batched with the KV cache.

    `min_new_tokens` suppresses the stop tokens until that many are generated (benchmarks use it
    so every sample has the same length). Sampling draws from its own RNG, seeded afresh for each batch
    from `seed` and the batch's first item (`first` is the index of `prompts[0]` in a larger list): a batch
    samples the same completions whichever process runs it and whatever ran before it, and an evaluation
    in the middle of training leaves the training RNG (dropout, TRL's sampling seeds) where it was.
    """
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    stop = stop_ids(model, tokenizer)
    model.eval()
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  num_return_sequences=num_return_sequences, eos_token_id=stop,
                                  pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if do_sample:
        kwargs["temperature"] = temperature
    if min_new_tokens:
        kwargs["min_new_tokens"] = min_new_tokens
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            groups = []
            for begin in range(0, len(prompts), batch_size):
                torch.manual_seed(batch_seed(seed, first + begin))
                groups += _generate_batch(model, tokenizer, prompts[begin:begin + batch_size], kwargs)
            return groups
    finally:
        tokenizer.padding_side = side


def batch_seed(seed: int, first_item: int) -> int:
    """The sampling seed of the batch that starts at item `first_item` (a large odd multiplier keeps the
    seeds of nearby runs and batches apart)."""
    return (seed * ITEM_SEED + first_item) % 2**63


def _generate_batch(model, tokenizer, prompts: list[str], kwargs: dict[str, Any]) -> list[list[str]]:
    """One left-padded batch: the completions of each prompt, as text after the prompt."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    generated = model.generate(**batch, **kwargs)
    texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    n = kwargs["num_return_sequences"]
    return [texts[i:i + n] for i in range(0, len(texts), n)]
