"""On-policy preference pairs: sample K responses per prompt, score them, pair best against worst.

This is where generation and scoring meet the pair format of `lmlab.data.pairs`;
DPO rounds, reward-model training and `lmlab pairs` all sample through it.
"""

from __future__ import annotations

from typing import Any

from lmlab.data.pairs import PairStats, pairs_from_scores, prompt_messages
from lmlab.distributed import shard, unshard
from lmlab.errors import LmlabError
from lmlab.evaluate.generation import generate
from lmlab.evaluate.orm import checked_scores

ITEM_SEED = 1_000_003  # prompt i of a call seeded s is sampled with s * this + i


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
    indices = shard(list(range(len(records))))
    mine = [records[i] for i in indices]
    prompts = [tokenizer.apply_chat_template(prompt_messages(r["prompt"], r.get("system") or system), tokenize=False,
                                            add_generation_prompt=True) for r in mine]
    sampled = [generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1, do_sample=True,
                        temperature=temperature, num_return_sequences=samples, seed=seed * ITEM_SEED + i)[0]
               for i, prompt in zip(indices, prompts)]
    flat = checked_scores(scorer, [p for p, g in zip(prompts, sampled) for _ in g], [r for g in sampled for r in g],
                          [rec for rec, g in zip(mine, sampled) for _ in g])
    scored = unshard([(texts, flat[i * samples:(i + 1) * samples]) for i, texts in enumerate(sampled)])
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

