"""The one evaluator: a model (or a checkpoint or ensemble directory) on tasks, as one metrics dict.

`lmlab eval`, the pipeline's closing comparison, the paper studies and the
in-training task callback all call it, so a metric has one name everywhere:
`<task>/<metric>` (`math_id/greedy_accuracy`, `math_id/maj@4`, `general_cloze/accuracy`,
`math_id/orm_score`), plus `general_bpb` and `math_bpb` for bits per byte on
held-out text, which compare across tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.evaluate.tasks import SAMPLING_TEMPERATURE

GENERAL_DOCS = 40  # held-out general documents for bits per byte (from the corpus's 1% validation split)
MATH_DOCS = 200  # held-out math problems with solutions for the domain's bits per byte


def math_texts(n: int = MATH_DOCS) -> list[str]:
    """Held-out math problems with their solutions (the evaluation slice training never sees)."""
    from lmlab.data.mathgen import as_text, math_problems

    return [as_text(p) for p in math_problems("id", n, seed=1, part="eval")]


def evaluate(model, tokenizer, tasks: list, samples: int = 1, scorer=None, general_bpb: bool = False,
             math_bpb: bool = False, seed: int = 0, temperature: float = SAMPLING_TEMPERATURE) -> dict[str, float]:
    """Bits per byte on held-out text (when asked) and every task's metrics; the ORM scores generative tasks,
    sampled at `temperature` (RL's own objective is the reward at its training temperature)."""
    from lmlab.data.split import held_out_general_texts
    from lmlab.evaluate.likelihood import text_bits_per_byte
    from lmlab.evaluate.tasks import run_task

    was_training = getattr(model, "training", False)
    model.eval()
    row: dict[str, float] = {}
    if general_bpb:
        row["general_bpb"] = text_bits_per_byte(model, tokenizer, held_out_general_texts(GENERAL_DOCS),
                                                max_length=512)
    if math_bpb:
        row["math_bpb"] = text_bits_per_byte(model, tokenizer, math_texts())
    for task in tasks:
        row.update(run_task(model, tokenizer, task, samples=samples, seed=seed, temperature=temperature,
                            scorer=scorer if task.kind == "generative" else None))
    model.train(was_training)
    return row


def evaluate_checkpoint(path: str | Path, tasks: list, samples: int = 1, orm: str | None = None,
                        general_bpb: bool = False, math_bpb: bool = False,
                        temperature: float = SAMPLING_TEMPERATURE, **load: Any) -> dict[str, float]:
    """`evaluate` on a checkpoint or ensemble directory, with its own tokenizer and an ORM by name."""
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.orm import load_scorer
    from lmlab.models.build import check_checkpoint, load_model, to_own_device

    check_checkpoint(Path(path), "checkpoint")  # config, weights header and tokenizer, before anything loads
    tokenizer = load_tokenizer(path)
    scorer = load_scorer(orm, tokenizer) if orm else None  # a bad ORM fails before the model loads
    model = to_own_device(load_model(path, **load))  # each rank of a launch scores its share on its own GPU
    return evaluate(model, tokenizer, tasks, samples, scorer, general_bpb, math_bpb, temperature=temperature)
