"""On-policy preference pairs: sample K responses per prompt, score them, pair best against worst.

This is where generation and scoring meet the pair format of `lmlab.data.pairs`;
DPO rounds, reward-model training and `lmlab pairs` all sample through it.
"""

from __future__ import annotations

from typing import Any

from lmlab.data.pairs import PairStats, pairs_from_scores, prompt_messages
from lmlab.distributed import map_in_chunks
from lmlab.errors import LmlabError
from lmlab.evaluate.generation import generate
from lmlab.evaluate.orm import checked_scores


def sample_pairs(model, tokenizer, records: list[dict[str, Any]], scorer, samples: int = 4,
                 temperature: float = 1.0, max_new_tokens: int = 48, system: str | None = None,
                 seed: int = 0) -> tuple[list[dict[str, Any]], PairStats]:
    """Sample `samples` responses per prompt from the policy, score them, and pair best against worst.

    Each prompt's samples are drawn with a seed of its own (the call's seed and the prompt's index),
    in a batch of their own (no padding from neighbours), so they depend on neither the number of
    processes nor the batch: the same recipe gives the same pairs on 1 and N processes. Under
    several processes each rank samples and scores its share of the prompts, and the shares are
    gathered back in prompt order, so every rank returns the same pairs.
    """
    if samples < 2:
        raise LmlabError("pairs need at least two samples per prompt", field="preference.samples")

    def sample_and_score(chunk: list[dict[str, Any]], start: int) -> list[tuple[list[str], list[float]]]:
        record = chunk[0]
        prompt = tokenizer.apply_chat_template(prompt_messages(record["prompt"], record.get("system") or system),
                                               tokenize=False, add_generation_prompt=True)
        return [(texts, per_scorer[0]) for texts, per_scorer in
                sampled_and_scored(model, tokenizer, [prompt], [record], [scorer], samples, temperature, max_new_tokens,
                                   seed, start)]

    scored = map_in_chunks(records, 1, sample_and_score)
    return pairs_from_scores(records, [t for t, _ in scored], [s for _, s in scored], system)


def pairs_file(checkpoint, prompts: str, n: int, samples: int, scorer: str, temperature: float, seed: int,
               out) -> PairStats:
    """`lmlab pairs`: on-policy pairs of a checkpoint over the math generator's prompts (or a prompts jsonl),
    ranked by a verifier or a reward model, written to `out`."""
    from pathlib import Path

    from lmlab.data.pairs import preference_inputs, write_pairs
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.orm import load_scorer
    from lmlab.models.build import load_model
    from lmlab.recipe import SourceSpec

    if prompts != "math" and not Path(prompts).is_file():
        raise LmlabError("prompts file not found", file=prompts, field="--prompts")
    spec = SourceSpec(kind="math", num_examples=n) if prompts == "math" else SourceSpec(kind="jsonl", path=prompts)
    given, records = preference_inputs([spec], seed)
    if given:
        raise LmlabError("the prompts file already holds pairs", file=prompts)
    tokenizer = load_tokenizer(checkpoint)
    made, stats = sample_pairs(load_model(checkpoint), tokenizer, records, load_scorer(scorer, tokenizer), samples,
                               temperature, seed=seed)
    write_pairs(made, out)
    return stats



def sampled_and_scored(model, tokenizer, prompts: list[str], items: list[dict[str, Any]], scorers: list, samples: int,
                       temperature: float, max_new_tokens: int = 48, seed: int = 0, first: int = 0
                       ) -> list[tuple[list[str], list[list[float]]]]:
    """One batch of rendered prompts: each prompt's `samples` sampled completions and, per scorer, their checked
    scores (each completion scored with its prompt's item, the answer say). The batch samples with the seed of its
    first item (`first`, lmlab.evaluate.generation.generate): on-policy pairs, the evaluation's sampled metrics and
    RL's pass rates all sample and score through here."""
    groups = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts),
                      do_sample=True, temperature=temperature, num_return_sequences=samples, seed=seed, first=first)
    flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    flat_items = [it for it, group in zip(items, groups) for _ in group]
    flat = [c for group in groups for c in group]
    scores = [checked_scores(scorer, flat_prompts, flat, flat_items) for scorer in scorers]
    return [(group, [s[i * samples:(i + 1) * samples] for s in scores]) for i, group in enumerate(groups)]


def pass_rates(model, tokenizer, prompts: list[str], items: list[dict[str, Any]], scorers: list, samples: int,
               temperature: float, max_new_tokens: int, seed: int = 0) -> list[float]:
    """Each rendered prompt's pass rate under the model: the share of its `samples` sampled completions that
    every scorer (verifiers) scores 1 or more.

    Batches are seeded by their first prompt and split over the processes like the evaluation's, so the
    rates are the same on any number of processes (every rank must call this)."""
    def rates(chunk: list[str], start: int) -> list[float]:
        scored = sampled_and_scored(model, tokenizer, chunk, items[start:start + len(chunk)], scorers, samples,
                                    temperature, max_new_tokens, seed, start)
        return [sum(all(scores[j] >= 1.0 for scores in per_scorer) for j in range(samples)) / samples
                for _, per_scorer in scored]

    return map_in_chunks(prompts, max(1, 64 // samples), rates)
