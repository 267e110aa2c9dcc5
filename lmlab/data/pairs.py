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
from typing import Any

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
        pair = {"prompt": prompt_messages(record["prompt"], record.get("system", system)),
                "chosen": [{"role": "assistant", "content": texts[hi]}],
                "rejected": [{"role": "assistant", "content": texts[lo]}],
                "chosen_score": float(values[hi]), "rejected_score": float(values[lo])}
        if "answer" in record:
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


def unpaired(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KTO's layout: each pair becomes a desirable and an undesirable (prompt, completion, label) example."""
    rows = []
    for pair in pairs:
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return rows


def preference_inputs(specs, seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pairs, prompts) from the recipe's sources: jsonl records with chosen/rejected are pairs; records
    with only a prompt (and an optional integer answer for verifiers), or the math generator, are prompts."""
    from lmlab.data.mathgen import DEFAULT_SYSTEM, as_prompt_record, math_problems
    from lmlab.data.sources import local_files, read_jsonl

    pairs: list[dict[str, Any]] = []
    prompts: list[dict[str, Any]] = []
    for spec in specs:
        if spec.kind == "math":
            split = "id" if spec.split == "train" else spec.split
            problems = math_problems(split, spec.num_examples, spec.seed if spec.seed is not None else seed)
            # the system prompt math SFT trains with, so sampling sees the SFT format
            prompts += [{**as_prompt_record(p), "system": DEFAULT_SYSTEM} for p in problems][: spec.limit]
            continue
        if spec.kind != "jsonl":
            raise LmlabError(f"preference data must be jsonl or math, not {spec.kind}", field="data.train")
        for path in local_files(spec.path):
            for line, record in read_jsonl(path):
                if "chosen" in record or "rejected" in record:
                    pairs.append(check_pair(record, str(path), line))
                elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
                    prompts.append({k: record[k] for k in ("prompt", "answer", "system") if k in record})
                else:
                    raise LmlabError("a record needs a text 'prompt' (and chosen/rejected for a pair)",
                                     file=str(path), line=line, field="prompt")
    if not pairs and not prompts:
        raise LmlabError("the preference data has no records", field="data.train")
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


def drop_overlong(tokenizer, pairs: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], int]:
    """The pairs whose both sides fit in `limit` tokens, and how many were dropped (always reported)."""
    kept = [p for p in pairs if max(pair_lengths(tokenizer, p)) <= limit]
    if not kept:
        raise LmlabError(f"every preference pair is longer than data.seq_len={limit} tokens", field="data.seq_len")
    return kept, len(pairs) - len(kept)
