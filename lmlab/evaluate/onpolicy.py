"""On-policy preference pairs: sample K responses per prompt, score them, pair best against worst.

This is where generation and scoring meet the pair format of `lmlab.data.pairs`;
DPO rounds, reward-model training and `lmlab pairs` all sample through it.
"""

from __future__ import annotations

from typing import Any

from lmlab.data.pairs import PairStats, pairs_from_scores, prompt_messages
from lmlab.errors import LmlabError
from lmlab.evaluate.generation import generate
from lmlab.evaluate.orm import checked_scores


def sample_pairs(model, tokenizer, records: list[dict[str, Any]], scorer, samples: int = 4,
                 temperature: float = 1.0, max_new_tokens: int = 48, system: str | None = None,
                 seed: int = 0, batch_size: int = 32) -> tuple[list[dict[str, Any]], PairStats]:
    """Sample `samples` responses per prompt from the policy, score them, and pair best against worst."""
    if samples < 2:
        raise LmlabError("pairs need at least two samples per prompt", field="preference.samples")
    prompts = [tokenizer.apply_chat_template(prompt_messages(r["prompt"], r.get("system") or system), tokenize=False,
                                            add_generation_prompt=True) for r in records]
    sampled = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                       batch_size=max(1, batch_size // samples), do_sample=True, temperature=temperature,
                       num_return_sequences=samples, seed=seed)
    flat = checked_scores(scorer, [p for p, g in zip(prompts, sampled) for _ in g], [r for g in sampled for r in g],
                          [rec for rec, g in zip(records, sampled) for _ in g])
    scores = [flat[i * samples:(i + 1) * samples] for i in range(len(records))]
    return pairs_from_scores(records, sampled, scores, system)
