"""The embedded `math` corpus: seeded arithmetic and word problems with verifiable integer answers.

It reproduces the EvoLM setup at laptop scale: general pretraining, then math
continued pretraining, SFT and RL, measured in-domain (ID) and out-of-domain (OOD).
The numbers are small on purpose: a ~2M-parameter model trained for minutes on a
CPU can learn them, so accuracy moves and the stages can be compared (with 2-digit
operands such a model only learns the format and stays near 0%).

- ID: addition and subtraction with operands 0-20, multiplication of single digits,
  in a few phrasings and word-problem templates.
- OOD: never seen in ID by construction: phrasings and word templates ID never uses
  (same small numbers: a shift of surface form), two-step expressions
  `(a op b) op c`, and operands 21-99 (beyond the ID range).
Answers may be negative (subtraction). Every solution ends with the canonical
"The answer is N." so an extractor can read the last integer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Split = Literal["id", "ood"]
DEFAULT_SYSTEM = "You are a careful assistant who solves arithmetic problems step by step."

ID_PHRASES = [
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "Calculate {a} {op} {b}.",
]
ID_WORD = {
    "+": "{name} has {a} apples and buys {b} more. How many apples does {name} have now?",
    "-": "{name} has {a} marbles and gives away {b}. How many marbles does {name} have left?",
    "*": "{name} buys {a} bags with {b} sweets in each bag. How many sweets does {name} have?",
}
OOD_PHRASES = [
    "Evaluate the expression {expr}.",
    "Find the value of {expr}.",
    "Work out {expr} and give the result.",
]
OOD_WORD = {
    "+": "A library holds {a} books and receives a donation of {b} books. How many books does it hold in total?",
    "-": "A tank contains {a} litres of water and {b} litres drain out. How many litres remain?",
    "*": "A farm has {a} rows of trees with {b} trees in each row. How many trees are on the farm?",
}
NAMES = ["Tom", "Ana", "Li", "Sara", "Omar", "Mia", "Ben", "Eva"]
ID_MAX = 20  # largest ID operand of + and -; OOD's "larger operands" start above it
EVAL_SHARE = 0.05  # the slice of each split's prompt space kept for evaluation, never trained on
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


@dataclass(frozen=True)
class MathProblem:
    prompt: str
    answer: int
    solution: str
    split: Split


def _operands(rng: random.Random, op: str, low: int, high: int) -> tuple[int, int]:
    return (rng.randint(2, 9), rng.randint(2, 9)) if op == "*" else (rng.randint(low, high), rng.randint(low, high))


def _one_step(a: int, op: str, b: int) -> tuple[int, str]:
    answer = OPS[op](a, b)
    return answer, f"{a} {op} {b} = {answer}. The answer is {answer}."


# distinct ID facts per operation: (a, b) with a, b in 0..ID_MAX for + and -, single digits from 2 for *
ID_FACTS = {"+": (ID_MAX + 1) ** 2, "-": (ID_MAX + 1) ** 2, "*": 8 * 8}
Balance = Literal["operations", "facts"]


def _id_problem(rng: random.Random, balance: Balance = "operations") -> MathProblem:
    # operations: each operation a third of the problems; facts: each (op, a, b) equally often, so the 441
    # subtraction facts are not drilled as rarely as the 64 products (which a third of the data over-learns)
    op = rng.choice("+-*") if balance == "operations" else rng.choices("+-*", weights=list(ID_FACTS.values()))[0]
    a, b = _operands(rng, op, 0, ID_MAX)
    if rng.random() < 0.3:
        prompt = ID_WORD[op].format(a=a, b=b, name=rng.choice(NAMES))
    else:
        prompt = rng.choice(ID_PHRASES).format(a=a, op=op, b=b)
    return MathProblem(prompt, *_one_step(a, op, b), "id")


def _ood_problem(rng: random.Random) -> MathProblem:
    kind = rng.random()
    if kind < 0.25:  # two-step expression
        op1, op2 = rng.choice("+-"), rng.choice("+-*")
        a, b, c = rng.randint(0, ID_MAX), rng.randint(0, ID_MAX), rng.randint(2, 9)
        first = OPS[op1](a, b)
        answer = OPS[op2](first, c)
        solution = f"{a} {op1} {b} = {first}. {first} {op2} {c} = {answer}. The answer is {answer}."
        return MathProblem(rng.choice(OOD_PHRASES).format(expr=f"({a} {op1} {b}) {op2} {c}"), answer, solution, "ood")
    op = rng.choice("+-*")
    if kind < 0.45:  # larger operands, in ID's own phrasings
        if op == "*":
            a, b = rng.randint(ID_MAX + 1, 99), rng.randint(2, 9)
        else:
            a, b = rng.randint(ID_MAX + 1, 99), rng.randint(0, 99)
        if rng.random() < 0.5:
            a, b = b, a
        return MathProblem(rng.choice(ID_PHRASES).format(a=a, op=op, b=b), *_one_step(a, op, b), "ood")
    a, b = _operands(rng, op, 0, ID_MAX)  # ID's numbers in phrasings ID never uses
    if kind < 0.7:
        return MathProblem(OOD_WORD[op].format(a=a, b=b), *_one_step(a, op, b), "ood")
    return MathProblem(rng.choice(OOD_PHRASES).format(expr=f"{a} {op} {b}"), *_one_step(a, op, b), "ood")


def is_eval_prompt(prompt: str) -> bool:
    """Whether a prompt belongs to the evaluation slice (a stable hash of its text, like data validation splits)."""
    from lmlab.data.split import doc_hash

    return doc_hash(f"math:{prompt}") < EVAL_SHARE


def math_problems(split: Split, n: int, seed: int = 0, part: Literal["train", "eval"] = "train",
                  balance: Balance = "operations", family: str | None = None) -> list[MathProblem]:
    """`n` problems of one split, distinct while the space allows; the same seed gives the same list.

    `part="eval"` draws only from a held-out 5% slice of the prompt space and `"train"` never
    does, so evaluation never sees a trained prompt even though the ID space is small (about
    10k prompts). A large training corpus repeats problems once its part of the space is
    nearly exhausted, as a drilled arithmetic table would. OOD items are always OOD; `family` keeps
    only one of OOD_FAMILIES (the same stream, the other families skipped).
    """
    if split not in ("id", "ood"):
        raise ValueError(f"split must be 'id' or 'ood', not {split!r}")
    rng = random.Random(f"lmlab-math-{split}-{seed}" + ("" if balance == "operations" else f"-{balance}"))
    make = (lambda r: _id_problem(r, balance)) if split == "id" else _ood_problem
    seen: set[str] = set()
    problems: list[MathProblem] = []
    misses = 0  # consecutive repeats: many in a row means the space is nearly used up
    while len(problems) < n:
        problem = make(rng)
        if (split == "ood" and not is_ood(problem.prompt)) or is_eval_prompt(problem.prompt) != (part == "eval"):
            continue
        if family is not None and ood_family(problem.prompt) != family:
            continue
        if problem.prompt in seen and misses < 20:
            misses += 1
            continue
        misses = 0
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def source_problems(spec, seed: int) -> list[MathProblem]:
    """The problems a `kind: math` source stands for: its split, count, seed (else the recipe's) and balance."""
    split = "id" if spec.split == "train" else spec.split
    return math_problems(split, spec.num_examples, spec.seed if spec.seed is not None else seed,
                         balance=spec.balance)


def is_ood(prompt: str) -> bool:
    """True when a prompt has a property no ID problem has: an operand above ID_MAX, parentheses or an OOD phrasing."""
    import re

    if any(int(num) > ID_MAX for num in re.findall(r"\d+", prompt)) or "(" in prompt:
        return True
    stems = [p.split("{")[0] for p in OOD_PHRASES] + [w.split("{")[0] for w in OOD_WORD.values()]
    return any(prompt.startswith(stem) for stem in stems)


OOD_FAMILIES = ("phrasing", "two_step", "operands")  # how an OOD prompt differs from ID (they may peak apart)


def ood_family(prompt: str) -> str:
    """Which way an OOD prompt leaves ID: `two_step` (a parenthesised expression), `operands` (a number above
    ID_MAX in one step) or `phrasing` (ID's numbers in a phrasing ID never uses)."""
    import re

    if "(" in prompt:
        return "two_step"
    if any(int(num) > ID_MAX for num in re.findall(r"\d+", prompt)):
        return "operands"
    return "phrasing"


def as_text(problem: MathProblem) -> str:
    """Plain text for (continued) pretraining."""
    return f"Question: {problem.prompt}\nAnswer: {problem.solution}"


def as_chat(problem: MathProblem, system: str | None = DEFAULT_SYSTEM) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": problem.solution}]
    return {"messages": messages}


def as_prompt_record(problem: MathProblem) -> dict:
    return {"prompt": problem.prompt, "answer": problem.answer}
