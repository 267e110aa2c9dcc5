"""Evaluation tasks as data: a YAML file over a local jsonl, or one of the embedded tasks.

    name: my_mc
    kind: cloze            # or: generative
    path: items.jsonl      # relative to the YAML file
    normalisation: chars   # cloze: chars | tokens | none

A cloze item is {"prompt", "choices": [...], "gold": index}; a generative item is
{"prompt", "answer": integer}. Embedded tasks need no files: `math_id` and
`math_ood` (generative, from the math generator at a seed apart from training
data), each OOD family alone (`math_ood_phrasing`, `math_ood_two_step`,
`math_ood_operands`: distinct held-out prompts, at most n) and `general_cloze`
(pick the true next line of standard-library text).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from lmlab.stats import Estimate

from lmlab.errors import LmlabError

EMBEDDED = ("math_id", "math_ood", "math_ood_phrasing", "math_ood_two_step", "math_ood_operands", "general_cloze")
EVAL_SEED = 1234  # apart from the training seeds (0, ...) used by the recipes
SAMPLING_TEMPERATURE = 0.8  # maj@k, pass@k and the ORM score, unless the caller asks for another


@dataclass
class Task:
    name: str
    kind: Literal["cloze", "generative"]
    items: list[dict[str, Any]]
    normalisation: str = "chars"
    where: str = "<embedded>"
    extra: dict[str, Any] = field(default_factory=dict)


def _check_items(task: Task) -> Task:
    if not task.items:
        raise LmlabError(f"task '{task.name}' has no items", file=task.where)
    for i, item in enumerate(task.items, start=1):
        if "prompt" not in item:
            raise LmlabError("item has no 'prompt'", file=task.where, line=item.get("_line", i), field="prompt")
        if task.kind == "cloze":
            choices, gold = item.get("choices"), item.get("gold")
            if not isinstance(choices, list) or len(choices) < 2:
                raise LmlabError("a cloze item needs at least two choices", file=task.where,
                                 line=item.get("_line", i), field="choices")
            if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise LmlabError(f"gold {gold!r} is not an index into its {len(choices)} choices", file=task.where,
                                 line=item.get("_line", i), field="gold")
        elif isinstance(item.get("answer"), bool) or not isinstance(item.get("answer"), int):
            raise LmlabError("a generative item needs an integer 'answer'", file=task.where,
                             line=item.get("_line", i), field="answer")
    return task


def embedded_task(name: str, n: int = 200) -> Task:
    if name in ("math_id", "math_ood"):
        from lmlab.data.mathgen import as_prompt_record, math_problems

        items = [as_prompt_record(p) for p in math_problems(name.split("_")[1], n, EVAL_SEED, part="eval")]
        return Task(name, "generative", items)
    if name.startswith("math_ood_") and name in EMBEDDED:  # one OOD family alone: they may peak at different epochs
        from lmlab.data.mathgen import as_prompt_record, math_problems

        # distinct prompts only: the held-out slice of the phrasing family has fewer than 200, and a repeated
        # item would narrow the interval without adding evidence
        problems = {p.prompt: p for p in math_problems("ood", n, EVAL_SEED, part="eval",
                                                       family=name.removeprefix("math_ood_"))}
        return Task(name, "generative", [as_prompt_record(p) for p in problems.values()])
    if name == "general_cloze":
        return Task(name, "cloze", general_cloze_items(n))
    raise LmlabError(f"unknown task '{name}'", field="--tasks",
                     hint=f"embedded tasks: {', '.join(EMBEDDED)}, or a task YAML file")


def general_cloze_items(n: int, choices: int = 4) -> list[dict[str, Any]]:
    """From held-out stdlib documents: given a few lines, pick the true next line among lines of other documents."""
    import random

    from lmlab.data.split import held_out_general_texts

    rng = random.Random(EVAL_SEED)
    docs = held_out_general_texts()
    lines_by_doc = [[line for line in d.splitlines() if len(line.strip()) > 20] for d in docs]
    pool = [line for lines in lines_by_doc for line in lines]
    items = []
    for lines in lines_by_doc:
        for i in range(3, len(lines), 7):
            if len(items) == n:
                return items
            true_line = lines[i]
            distractors = rng.sample([line for line in pool if line != true_line], choices - 1)
            options = [true_line] + distractors
            rng.shuffle(options)
            items.append({"prompt": "\n".join(lines[i - 3:i]) + "\n", "choices": options,
                          "gold": options.index(true_line)})
    return items


def load_task(spec: str, n: int = 200) -> Task:
    """An embedded task name or a task YAML path."""
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        return _check_items(embedded_task(spec, n))
    from lmlab.data.sources import read_jsonl
    from lmlab.loading import read_yaml

    config, _ = read_yaml(spec, "task")
    unknown = set(config) - {"name", "kind", "path", "normalisation"}
    if unknown:
        raise LmlabError(f"unknown key '{sorted(unknown)[0]}'", file=spec, field=sorted(unknown)[0])
    if config.get("kind") not in ("cloze", "generative"):
        raise LmlabError("kind must be cloze or generative", file=spec, field="kind")
    if config.get("normalisation", "chars") not in ("chars", "tokens", "none"):
        raise LmlabError("normalisation must be chars, tokens or none", file=spec, field="normalisation")
    data = path.parent / config.get("path", "")
    if not data.is_file():
        raise LmlabError(f"items file not found: {data}", file=spec, field="path")
    items = [{**record, "_line": line} for line, record in read_jsonl(data)]
    return _check_items(Task(config.get("name", path.stem), config["kind"], items,
                             config.get("normalisation", "chars"), where=str(data)))


def run_task(model, tokenizer, task: Task, samples: int = 1, temperature: float = SAMPLING_TEMPERATURE,
             batch_size: int = 64, seed: int = 0, scorer=None) -> dict[str, "Estimate"]:
    """Each metric as an Estimate over the task's items (interval, n, and the per-item scores a paired
    comparison needs). Cloze: accuracy. Generative: greedy accuracy, and with samples > 1 maj@k, pass@k and
    mean@k (k = samples; mean@k is the share of samples that are right); with a scorer, also the ORM score: its
    mean over the same sampled responses.

    Under a launcher the items are split over the processes in whole batches and gathered back
    (`map_in_chunks`): every rank must call this, each scores its share, and the result is the same
    as one process's. A batch is at most half the items, so two processes share even a small task; it
    never depends on the number of processes, which would change the padding of a batch."""
    import math

    from lmlab.distributed import map_in_chunks
    from lmlab.stats import Estimate

    def batch_of(size: int) -> int:
        return max(1, min(size, math.ceil(len(task.items) / 2)))

    if task.kind == "cloze":
        from lmlab.evaluate.likelihood import pick, score_options

        def cloze(chunk, start):
            return [float(pick(score_options(model, tokenizer, it["prompt"], it["choices"], batch_size),
                               task.normalisation) == it["gold"]) for it in chunk]

        return {f"{task.name}/accuracy": Estimate(map_in_chunks(task.items, batch_of(16), cloze), binary=True)}
    from lmlab.data.mathgen import DEFAULT_SYSTEM
    from lmlab.evaluate.generation import extract_integer, generate, render_prompts

    prompts = render_prompts(tokenizer, [it["prompt"] for it in task.items], system=DEFAULT_SYSTEM)
    greedy = map_in_chunks(prompts, batch_of(batch_size), lambda chunk, start: generate(model, tokenizer, chunk,
                                                                              batch_size=len(chunk)))
    out = {f"{task.name}/greedy_accuracy":
           Estimate([float(extract_integer(g[0]) == it["answer"]) for g, it in zip(greedy, task.items)], binary=True),
           f"{task.name}/greedy_accuracy_flexible":
           Estimate([float(extract_integer(g[0], flexible=True) == it["answer"]) for g, it in zip(greedy, task.items)],
                    binary=True)}
    if samples > 1 or scorer is not None:
        out.update(_sampled_metrics(model, tokenizer, task, prompts, samples, temperature,
                                    batch_of(max(1, batch_size // samples)), seed, scorer))
    return out


def _sampled_metrics(model, tokenizer, task: Task, prompts: list[str], samples: int, temperature: float, batch: int,
                     seed: int, scorer) -> dict[str, "Estimate"]:
    """maj@k and pass@k (k = samples > 1) and, with a scorer, its mean score over the same samples."""
    from lmlab.distributed import map_in_chunks
    from lmlab.evaluate.generation import extract_integer
    from lmlab.evaluate.metrics import maj_at_k, pass_at_k
    from lmlab.evaluate.onpolicy import sampled_and_scored
    from lmlab.stats import Estimate

    def sample_and_score(chunk, start):
        scored = sampled_and_scored(model, tokenizer, chunk, task.items[start:start + len(chunk)],
                                    [scorer] if scorer is not None else [], samples, temperature, seed=seed,
                                    first=start)
        return [(group, sum(per_scorer[0]) / samples if per_scorer else None) for group, per_scorer in scored]

    scored = map_in_chunks(prompts, batch, sample_and_score)
    out = {}
    if scorer is not None:
        out[f"{task.name}/orm_score"] = Estimate([score for _, score in scored], binary=False)
    if samples > 1:
        answers = [[extract_integer(s) for s in group] for group, _ in scored]
        out[f"{task.name}/maj@{samples}"] = Estimate([maj_at_k(a, it["answer"], samples)
                                                      for a, it in zip(answers, task.items)], binary=True)
        right = [sum(x == it["answer"] for x in a) for a, it in zip(answers, task.items)]
        out[f"{task.name}/pass@{samples}"] = Estimate([pass_at_k(samples, c, samples) for c in right])
        # the share of the samples that are right (pass@1's unbiased estimate): the verifier's own score of the
        # samples, which a learned ORM's score is compared with
        out[f"{task.name}/mean@{samples}"] = Estimate([c / samples for c in right], binary=False)
    return out
