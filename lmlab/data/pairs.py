"""Preference pairs: sampled on-policy and scored, or read from jsonl and checked before any compute.

docs/rules.md §5: DPO overfits after one epoch, so iterate on fresh on-policy pairs.
`lmlab.evaluate.onpolicy.sample_pairs` draws K responses per prompt from the current policy, scores them
with a verifier or a reward model, and keeps best vs worst; prompts whose K
scores are all equal carry no preference and are dropped (and counted).

A pair is conversational, the layout TRL's DPO, ORPO and reward trainers read:
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}],
     "chosen": [{"role": "assistant", "content": ...}], "rejected": [...],
     "chosen_score": 1.0, "rejected_score": 0.0}
Plain strings for prompt/chosen/rejected are accepted too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lmlab.errors import LmlabError

PAIR_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PairStats:
    prompts: int
    pairs: int
    ties_dropped: int
    mean_best: float
    mean_worst: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def prompt_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def pairs_from_scores(records: list[dict[str, Any]], responses: list[list[str]], scores: list[list[float]],
                      system: str | None = None) -> tuple[list[dict[str, Any]], PairStats]:
    """Best vs worst response per prompt; a prompt whose responses all score the same is dropped.

    Ties among the best (or the worst) go to the first sampled, so the choice is reproducible.
    """
    pairs, ties, best_sum, worst_sum = [], 0, 0.0, 0.0
    for record, texts, values in zip(records, responses, scores):
        if len(texts) != len(values) or len(texts) < 2:
            raise LmlabError(f"need at least two scored responses per prompt, got {len(values)}", field="samples")
        hi = max(range(len(values)), key=lambda i: (values[i], -i))
        lo = min(range(len(values)), key=lambda i: (values[i], i))
        best_sum, worst_sum = best_sum + values[hi], worst_sum + values[lo]
        if values[hi] == values[lo] or texts[hi] == texts[lo]:
            ties += 1
            continue
        pair = {"prompt": prompt_messages(record["prompt"], record.get("system") or system),
                "chosen": [{"role": "assistant", "content": texts[hi]}],
                "rejected": [{"role": "assistant", "content": texts[lo]}],
                "chosen_score": float(values[hi]), "rejected_score": float(values[lo])}
        if record.get("answer") is not None:
            pair["answer"] = record["answer"]
        pairs.append(pair)
    n = max(1, len(records))
    return pairs, PairStats(len(records), len(pairs), ties, best_sum / n, worst_sum / n)


def write_pairs(pairs: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for pair in pairs:
            fh.write(json.dumps(pair) + "\n")
    return path


def _content(value: Any) -> str | None:
    """The text of a pair field: a string, or the last message's content in a message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"),
                                                                                       str):
        return value[-1]["content"]
    return None


def check_pair(record: dict[str, Any], where: str, line: int) -> dict[str, Any]:
    """A pair with prompt, chosen and rejected, where chosen and rejected differ."""
    for name in PAIR_FIELDS:
        if name not in record:
            raise LmlabError(f"a preference pair needs '{name}'", file=where, line=line, field=name)
        if _content(record[name]) is None:
            raise LmlabError(f"'{name}' must be text or a list of messages with text content", file=where,
                             line=line, field=name)
    if _content(record["chosen"]) == _content(record["rejected"]):
        raise LmlabError("chosen and rejected are the same response: the pair carries no preference",
                         file=where, line=line, field="chosen")
    return {k: record[k] for k in PAIR_FIELDS}


def pairs_table(pairs):
    """The pairs as a `datasets` table of exactly PAIR_FIELDS: a list (sampled this round, bounded by
    generation) is converted, a table (given pairs, disk-backed) keeps its files."""
    from datasets import Dataset

    if isinstance(pairs, list):
        return Dataset.from_list([{k: pair[k] for k in PAIR_FIELDS} for pair in pairs])
    return pairs.select_columns(list(PAIR_FIELDS))


def unpaired(pairs):
    """KTO's layout: each pair (of a `datasets` table) becomes a desirable and an undesirable
    (prompt, completion, label) example, side by side."""
    def split(batch):
        n = len(batch["prompt"])
        return {"prompt": [p for p in batch["prompt"] for _ in range(2)],
                "completion": [c for i in range(n) for c in (batch["chosen"][i], batch["rejected"][i])],
                "label": [label for _ in range(n) for label in (True, False)]}

    return pairs.map(split, batched=True, remove_columns=pairs.column_names)


PROMPT_FIELDS = ("prompt", "answer", "system")


def _preference_records(specs, seed: int) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """(file, line, row) for every record, checked; a row has every pair and prompt field (None if absent)."""
    from lmlab.data.mathgen import DEFAULT_SYSTEM, as_prompt_record, source_problems
    from lmlab.data.sources import local_files, read_records

    blank = dict.fromkeys(PAIR_FIELDS + PROMPT_FIELDS)
    for spec in specs:
        if spec.kind == "math":
            problems = source_problems(spec, seed)
            for i, problem in enumerate(problems[: spec.limit]):
                # the system prompt math SFT trains with, so sampling sees the SFT format
                yield "math", i + 1, {**blank, **as_prompt_record(problem), "system": DEFAULT_SYSTEM}
            continue
        for path in local_files(spec.path, spec.kind):
            for line, record in read_records(path):
                if "chosen" in record or "rejected" in record:
                    yield str(path), line, {**blank, **check_pair(record, str(path), line)}
                elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
                    yield str(path), line, {**blank, **{k: record[k] for k in PROMPT_FIELDS if k in record}}
                else:
                    raise LmlabError("a record needs a text 'prompt' (and chosen/rejected for a pair)",
                                     file=str(path), line=line, field="prompt")


def preference_inputs(specs, seed: int = 0):
    """(pairs, prompts) from the recipe's sources, as disk-backed `datasets` tables read once per content:
    jsonl records with chosen/rejected are pairs; records with only a prompt (an optional integer answer for
    verifiers, an optional system prompt), or the math generator, are prompts. Fields a record lacks are None.
    """
    import numpy as np
    import pyarrow.compute as pc

    from lmlab.data.records import cached_records, records_fingerprint, uniform_rows
    from lmlab.data.store import source_fingerprint

    for spec in specs:
        if spec.kind not in ("jsonl", "csv", "math"):
            raise LmlabError(f"preference data must be jsonl, csv or math, not {spec.kind}", field="data.train")
    identity = records_fingerprint("preference", [source_fingerprint(s, seed) for s in specs])
    table = cached_records(lambda: uniform_rows(_preference_records(specs, seed)), identity)
    if table is None:
        raise LmlabError("the preference data has no records", field="data.train")
    is_pair = pc.is_valid(table.data.column("chosen")).to_numpy(zero_copy_only=False)
    pairs = table.select(np.flatnonzero(is_pair)).select_columns(list(PAIR_FIELDS))
    prompts = table.select(np.flatnonzero(~is_pair)).select_columns(list(PROMPT_FIELDS))
    return pairs, prompts


def pair_lengths(tokenizer, pair: dict[str, Any]) -> tuple[int, int]:
    """Tokens of prompt + chosen and of prompt + rejected, as the chat template renders them."""
    def length(completion: Any) -> int:
        if isinstance(pair["prompt"], list):
            messages = pair["prompt"] + (completion if isinstance(completion, list)
                                         else [{"role": "assistant", "content": completion}])
            return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        return len(tokenizer(pair["prompt"] + _content(completion), add_special_tokens=False)["input_ids"])

    return length(pair["chosen"]), length(pair["rejected"])


def drop_overlong(tokenizer, pairs, limit: int):
    """The pairs (a `datasets` table) whose both sides fit in `limit` tokens, and how many were dropped
    (always reported); the lengths are a cached `map`, so a resume does not render the pairs again."""
    import numpy as np

    from lmlab.data.records import cached_map, chat_fingerprint, records_fingerprint

    def longest(batch):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"longest": [max(pair_lengths(tokenizer, row)) for row in rows]}

    lengths = cached_map(pairs.select_columns(list(PAIR_FIELDS)), longest,
                         records_fingerprint(pairs._fingerprint, chat_fingerprint(tokenizer), "longest"),
                         remove_columns=list(PAIR_FIELDS))
    kept = np.flatnonzero(np.asarray(lengths["longest"]) <= limit)
    if not len(kept):
        raise LmlabError(f"every preference pair is longer than data.seq_len={limit} tokens", field="data.seq_len")
    return pairs.select(kept), len(pairs) - len(kept)
