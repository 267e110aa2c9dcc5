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
        texts = generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1, do_sample=True,
                         temperature=temperature, num_return_sequences=samples, seed=seed, first=start)[0]
        return [(texts, checked_scores(scorer, [prompt] * len(texts), texts, [record] * len(texts)))]

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



def pass_rates(model, tokenizer, prompts: list[str], answers: list | None, rewards: list, samples: int,
               temperature: float, max_new_tokens: int, seed: int = 0) -> list[float]:
    """Each rendered prompt's pass rate under the model: the share of its `samples` sampled completions that
    every reward (TRL-style functions of prompts, completions and the answer column) scores 1 or more.

    Batches are seeded by their first prompt and split over the processes like the evaluation's, so the
    rates are the same on any number of processes (every rank must call this)."""
    def rates(chunk: list[str], start: int) -> list[float]:
        groups = generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=len(chunk),
                          do_sample=True, temperature=temperature, num_return_sequences=samples, seed=seed,
                          first=start)
        flat_prompts = [p for p, group in zip(chunk, groups) for _ in group]
        flat = [c for group in groups for c in group]
        columns = {} if answers is None else \
            {"answer": [a for a, group in zip(answers[start:start + len(chunk)], groups) for _ in group]}
        scores = [reward(flat_prompts, flat, **columns) for reward in rewards]
        passed = [all(score >= 1.0 for score in per_reward) for per_reward in zip(*scores)]
        return [sum(passed[i * samples:(i + 1) * samples]) / samples for i in range(len(groups))]

    return map_in_chunks(prompts, max(1, 64 // samples), rates)
