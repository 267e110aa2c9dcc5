"""Outcome-reward-model (ORM) scores of sampled responses: a verifier or a trained reward model.

EvoLM: after pretraining, validation loss stops predicting problem solving, while
the mean ORM score of sampled answers tracks maj@k accuracy (r^2 0.62-0.84). Both
kinds of scorer take (prompt, response, item) and return a number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Protocol

from lmlab.errors import LmlabError


class Scorer(Protocol):
    def __call__(self, prompts: list[str], responses: list[str], items: list[dict[str, Any]]) -> list[float]: ...


def math_exact(prompts: list[str], responses: list[str], items: list[dict[str, Any]]) -> list[float]:
    """1.0 when the response's final integer equals the item's answer (a verifiable reward)."""
    from lmlab.evaluate.generation import extract_integer

    return [float(extract_integer(r) == it["answer"]) for r, it in zip(responses, items)]


FINAL_ANSWER = re.compile(r"The answer is -?\d[\d,]*\.?\s*$")


def math_format(prompts: list[str], responses: list[str], items: list[dict[str, Any]]) -> list[float]:
    """1.0 when the response ends with the canonical "The answer is N." (a format reward, whatever N is)."""
    return [float(bool(FINAL_ANSWER.search(r.strip()))) for r in responses]


VERIFIERS: dict[str, Callable] = {"math_exact": math_exact, "math_format": math_format}


def checked_scores(scorer: Scorer, prompts: list[str], responses: list[str], items: list[dict[str, Any]]) -> list[float]:
    """The scorer's scores, refused unless there is one finite number per response."""
    import math

    scores = list(scorer(prompts, responses, items))
    if len(scores) != len(responses):
        raise LmlabError(f"the scorer returned {len(scores)} scores for {len(responses)} responses", field="orm")
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise LmlabError(f"the scorer returned {score!r}, not a finite number", field="orm")
    return [float(x) for x in scores]


class RewardModelScorer:
    """A sequence-classification model with one output: its logit is the reward of prompt + response."""

    def __init__(self, path: str | Path, batch_size: int = 16):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from lmlab.data.tokenizer import load_tokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "num_labels", None) != 1:
            raise LmlabError(f"a reward model needs a single-output head, this one has {config.num_labels} labels",
                             file=str(path), field="num_labels")
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
        self.batch_size = batch_size

    def __call__(self, prompts: list[str], responses: list[str], items: list[dict[str, Any]]) -> list[float]:
        import torch

        scores: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            texts = [p + r for p, r in zip(prompts[start:start + self.batch_size],
                                            responses[start:start + self.batch_size])]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                scores += self.model(**batch).logits[:, 0].float().tolist()
        return scores


def check_same_tokenizer(reward_tokenizer, policy_tokenizer, where: str, field: str = "tokenizer") -> None:
    """A reward model reads the policy's rendered text; a different vocabulary would score other tokens."""
    if reward_tokenizer.get_vocab() != policy_tokenizer.get_vocab():
        raise LmlabError("the reward model's tokenizer differs from the policy's", file=where, field=field,
                         hint="train the reward model from the same base (lmlab rm) so both share one tokenizer")


def load_scorer(spec: str, policy_tokenizer=None) -> Scorer:
    """A built-in verifier name, or a reward-model directory (checked against the policy's tokenizer)."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if Path(spec).is_dir():
        from lmlab.models.build import check_checkpoint

        check_checkpoint(Path(spec), "reward model")  # safetensors, readable, no custom code, a tokenizer
        scorer = RewardModelScorer(spec)
        if policy_tokenizer is not None:
            check_same_tokenizer(scorer.tokenizer, policy_tokenizer, spec)
        return scorer
    raise LmlabError(f"unknown scorer '{spec}'", field="orm",
                     hint=f"a verifier ({', '.join(VERIFIERS)}) or a reward-model directory")
