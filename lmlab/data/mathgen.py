"""The embedded `math` corpus: seeded arithmetic and word problems with verifiable integer answers.

It reproduces the EvoLM setup at laptop scale: general pretraining, then math
continued pretraining, SFT and RL, measured in-domain (ID) and out-of-domain (OOD).

- ID: addition and subtraction of 1-2 digit numbers, and multiplication of single
  digits, in a few phrasings and word-problem templates.
- OOD: never seen in ID by construction: at least one 3-digit operand, two-step
  expressions `(a op b) op c`, and phrasings and templates ID never uses.
Answers may be negative (subtraction). Every solution ends with the canonical
"The answer is N." so an extractor can read the last integer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Literal

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
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


@dataclass(frozen=True)
class MathProblem:
    prompt: str
    answer: int
    solution: str
    split: Split


def _id_problem(rng: random.Random) -> MathProblem:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 9), rng.randint(2, 9)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
    answer = OPS[op](a, b)
    if rng.random() < 0.3:
        prompt = ID_WORD[op].format(a=a, b=b, name=rng.choice(NAMES))
    else:
        prompt = rng.choice(ID_PHRASES).format(a=a, op=op, b=b)
    return MathProblem(prompt, answer, f"{a} {op} {b} = {answer}. The answer is {answer}.", "id")


def _ood_problem(rng: random.Random) -> MathProblem:
    kind = rng.random()
    if kind < 0.4:  # two-step expression
        op1, op2 = rng.choice("+-"), rng.choice("+-*")
        a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
        first = OPS[op1](a, b)
        answer = OPS[op2](first, c)
        expr = f"({a} {op1} {b}) {op2} {c}"
        solution = f"{a} {op1} {b} = {first}. {first} {op2} {c} = {answer}. The answer is {answer}."
    else:  # a 3-digit operand, never used in ID
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(100, 999), rng.randint(2, 9)
        else:
            a, b = rng.randint(100, 999), rng.randint(0, 999)
        if rng.random() < 0.5:
            a, b = b, a
        answer = OPS[op](a, b)
        if rng.random() < 0.3:
            prompt = OOD_WORD[op].format(a=a, b=b)
            return MathProblem(prompt, answer, f"{a} {op} {b} = {answer}. The answer is {answer}.", "ood")
        expr = f"{a} {op} {b}"
        solution = f"{expr} = {answer}. The answer is {answer}."
    return MathProblem(rng.choice(OOD_PHRASES).format(expr=expr), answer, solution, "ood")


def math_problems(split: Split, n: int, seed: int = 0) -> list[MathProblem]:
    """`n` distinct problems of one split; the same seed always gives the same list."""
    if split not in ("id", "ood"):
        raise ValueError(f"split must be 'id' or 'ood', not {split!r}")
    rng = random.Random(f"lmlab-math-{split}-{seed}")
    make = _id_problem if split == "id" else _ood_problem
    seen: set[str] = set()
    problems: list[MathProblem] = []
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot generate {n} distinct {split} problems")
        problem = make(rng)
        if problem.prompt in seen or (split == "ood" and not is_ood(problem.prompt)):
            continue
        seen.add(problem.prompt)
        problems.append(problem)
    return problems


def is_ood(prompt: str) -> bool:
    """True when a prompt has a property no ID problem has: a 3+ digit number, parentheses or an OOD phrasing."""
    import re

    if any(len(num) >= 3 for num in re.findall(r"\d+", prompt)) or "(" in prompt:
        return True
    stems = [p.split("{")[0] for p in OOD_PHRASES] + [w.split("{")[0] for w in OOD_WORD.values()]
    return any(prompt.startswith(stem) for stem in stems)


def as_text(problem: MathProblem) -> str:
    """Plain text for (continued) pretraining."""
    return f"Question: {problem.prompt}\nAnswer: {problem.solution}"


def as_chat(problem: MathProblem, system: str | None = DEFAULT_SYSTEM) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": problem.solution}]
    return {"messages": messages}


def as_prompt_record(problem: MathProblem) -> dict:
    return {"prompt": problem.prompt, "answer": problem.answer}


def math_documents(split: Split, n: int, seed: int = 0,
                   format: Literal["text", "chat", "prompt"] = "text") -> Iterator[tuple[str, object]]:
    """`(doc_id, record)` pairs in the chosen format, ids like `math-id-12`."""
    render = {"text": as_text, "chat": as_chat, "prompt": as_prompt_record}[format]
    for i, problem in enumerate(math_problems(split, n, seed)):
        yield f"math-{split}-{seed}-{i}", render(problem)
