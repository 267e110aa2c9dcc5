"""Where a checkpoint's in-domain errors are: by operation, by phrasing, by answer size, and whether the
operands were copied right (the form) while the result was wrong (the fact).

usage: python docs/experiments/analyze_errors.py CHECKPOINT [N]
Greedy answers on the first N (default 500) held-out ID prompts, exactly as `lmlab eval` renders them.
"""
import re
import sys
from collections import Counter, defaultdict

from lmlab.data.mathgen import DEFAULT_SYSTEM, ID_WORD, math_problems
from lmlab.data.tokenizer import load_tokenizer
from lmlab.evaluate.generation import extract_integer, generate, render_prompts
from lmlab.evaluate.tasks import EVAL_SEED
from lmlab.models.build import load_model

path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 500
problems = math_problems("id", n, EVAL_SEED, part="eval")
model, tokenizer = load_model(path), load_tokenizer(path)
answers = generate(model, tokenizer, render_prompts(tokenizer, [p.prompt for p in problems], DEFAULT_SYSTEM),
                   batch_size=64)
groups = defaultdict(Counter)
form_right_fact_wrong, examples = 0, []
for problem, (text,) in zip(problems, answers):
    op = problem.solution.split(" ")[1]
    word = any(problem.prompt.startswith(t.split("{")[0][:8]) for t in ID_WORD.values()) or "has" in problem.prompt
    right = extract_integer(text) == problem.answer
    equation = problem.solution.split(". ")[0]  # "a op b = c"
    said = re.match(r"\s*(-?\d+) ([-+*]) (-?\d+) = (-?\d+)", text)
    operands_ok = bool(said) and said.group(1, 2, 3) == tuple(equation.split(" = ")[0].split(" "))
    for key in (f"op {op}", "word problem" if word else "phrase", f"answer {'<10' if abs(problem.answer) < 10 else '>=10'}",
                "operands copied" if operands_ok else "operands wrong", "all"):
        groups[key]["right" if right else "wrong"] += 1
    if operands_ok and not right:
        form_right_fact_wrong += 1
        if len(examples) < 12:
            examples.append(f"{problem.prompt!r} -> {text.strip()!r} (want {problem.answer})")
for key in sorted(groups):
    c = groups[key]
    total = c["right"] + c["wrong"]
    print(f"{key:18s} {c['right'] / total:.3f} of {total}")
print(f"operands copied right but result wrong: {form_right_fact_wrong}")
print("\n".join(examples))
