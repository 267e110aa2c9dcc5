"""The math generator: seeded, correct, and with out-of-domain items never seen in-domain."""

import re

from lmlab.data.mathgen import as_chat, as_prompt_record, as_text, is_ood, math_problems


def test_same_seed_same_problems_other_seed_different():
    assert math_problems("id", 200, seed=1) == math_problems("id", 200, seed=1)
    assert math_problems("id", 200, seed=1) != math_problems("id", 200, seed=2)


def test_answers_are_correct():
    for problem in math_problems("id", 500) + math_problems("ood", 500):
        steps = re.findall(r"(\(?-?\d+ [-+*] -?\d+\)?(?: [-+*] -?\d+)?) = (-?\d+)", problem.solution)
        assert steps, problem
        for expression, value in steps:
            assert eval(expression) == int(value), problem  # noqa: S307 - our own generated arithmetic
        assert problem.solution.endswith(f"The answer is {problem.answer}.")


def test_no_ood_prompt_appears_in_id_and_every_ood_item_is_ood():
    id_prompts = {p.prompt for p in math_problems("id", 3000)}
    ood = math_problems("ood", 3000)
    assert not id_prompts & {p.prompt for p in ood}
    assert all(is_ood(p.prompt) for p in ood)
    assert not any(is_ood(prompt) for prompt in id_prompts)


def test_id_operands_stay_small_ood_uses_new_forms():
    from lmlab.data.mathgen import ID_MAX, OOD_PHRASES

    for problem in math_problems("id", 1000):
        assert all(int(n) <= ID_MAX for n in re.findall(r"\d+", problem.prompt))
    ood = math_problems("ood", 1000)
    larger = [p for p in ood if any(int(n) > ID_MAX for n in re.findall(r"\d+", p.prompt))]
    two_step = [p for p in ood if "(" in p.prompt]
    new_phrasing = [p for p in ood if p not in larger and p not in two_step]
    assert len(larger) > 100 and len(two_step) > 100 and len(new_phrasing) > 300
    assert any(p.prompt.startswith(OOD_PHRASES[0].split("{")[0]) for p in new_phrasing)


def test_prompts_are_distinct_within_a_split():
    problems = math_problems("id", 2000)
    assert len({p.prompt for p in problems}) == 2000


def test_renderings():
    problem = math_problems("id", 1)[0]
    assert as_text(problem).startswith("Question: ") and problem.solution in as_text(problem)
    roles = [m["role"] for m in as_chat(problem)["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert as_prompt_record(problem) == {"prompt": problem.prompt, "answer": problem.answer}


def test_evaluation_prompts_are_never_training_prompts():
    for split in ("id", "ood"):
        train = {p.prompt for p in math_problems(split, 20000, seed=0)}
        held_out = math_problems(split, 200, seed=1234, part="eval")
        assert len({p.prompt for p in held_out}) == 200 and not train & {p.prompt for p in held_out}


def test_fact_balance_draws_each_id_fact_alike_and_leaves_the_default_stream_alone():
    """balance: facts weights the operations by their distinct facts (441, 441, 64), so subtraction is not
    drilled as rarely as the small product table; the default draws are exactly what they were."""
    from collections import Counter

    from lmlab.data.mathgen import ID_FACTS, math_problems

    ops = Counter(p.solution.split(" ")[1] for p in math_problems("id", 6000, 0, balance="facts"))
    total = sum(ID_FACTS.values())
    for op, facts in ID_FACTS.items():
        assert abs(ops[op] / 6000 - facts / total) < 0.03, (op, ops)
    assert [p.prompt for p in math_problems("id", 3, 0)] == [
        "What is 3 - 15?", "Calculate 14 + 10.", "Omar buys 3 bags with 2 sweets in each bag. How many sweets does "
        "Omar have?"]


def test_each_ood_family_is_its_own_held_out_task_of_distinct_prompts():
    """EvoLM's OOD may peak at different SFT epochs per family, so each is evaluated alone: every item of a
    family task is OOD, held out, of that family (by construction: parentheses, an operand above ID_MAX, or
    ID's numbers in an OOD phrasing), and counted once."""
    from lmlab.data.mathgen import ID_MAX, OOD_FAMILIES, is_eval_prompt, ood_family
    from lmlab.evaluate.tasks import load_task

    mixed = math_problems("ood", 1000)
    assert {ood_family(p.prompt) for p in mixed} == set(OOD_FAMILIES)
    for family in OOD_FAMILIES:
        items = load_task(f"math_ood_{family}", 300).items
        prompts = [it["prompt"] for it in items]
        assert len(set(prompts)) == len(prompts) > 100
        assert all(is_ood(p) and is_eval_prompt(p) and ood_family(p) == family for p in prompts)
        numbers = [int(n) for p in prompts for n in re.findall(r"\d+", p)]
        if family == "two_step":
            assert all("(" in p for p in prompts)
        elif family == "operands":
            assert all("(" not in p and any(int(n) > ID_MAX for n in re.findall(r"\d+", p)) for p in prompts)
        else:
            assert max(numbers) <= ID_MAX and not any("(" in p for p in prompts)
