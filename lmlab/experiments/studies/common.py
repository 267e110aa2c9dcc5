"""What every study shares: recipe trees merged over the study's base, validated before compute, run
in-process through the same stage runners as `lmlab run`, and reused once finished."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from lmlab.recipe import merge_blocks


def load_study(path: str | Path, model: type[BaseModel], overrides: list[str] | None = None):
    """The study file, with `--set key=value` overrides (to run the same study larger on a GPU, say), validated
    by its pydantic model; errors name file, line and field, or the --set that caused them."""
    from lmlab.loading import apply_override, override_keys, read_yaml, validate_recipe

    tree, root = read_yaml(path, "study")
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return validate_recipe(tree, str(path), root, model=model, overridden=override_keys(overrides))


class StudyRunner:
    """Runs stage recipe trees under `<study dir>/runs/<name>/`; a run with a final artifact is not run again,
    unless it is no longer the same run: its recipe changed (an edited study file, a --set) or the model it
    starts from was trained again after it. Then the study stops and says which run to delete, rather than
    report numbers from a run the file no longer describes."""

    def __init__(self, study_dir: Path, file: str, future: set[str] | None = None):
        self.dir, self.file, self.future = Path(study_dir), file, set(future or ())

    def final(self, name: str) -> Path:
        return self.dir / "runs" / name / "final"

    def validate(self, tree: dict):
        from lmlab.loading import validate_recipe

        tree = merge_blocks(tree, {"output": {"dir": str(self.dir / "runs")}})
        return validate_recipe(tree, file=f"{self.file} (run {tree['name']})", future_artifacts=self.future)

    def run(self, tree: dict) -> Path:
        from lmlab.stages import run_stage

        recipe = self.validate(tree)
        done = self.final(tree["name"]) / "lmlab.json"
        if done.is_file():
            self._check_reusable(recipe, done)
            return self.final(tree["name"])
        return run_stage(recipe, overwrite=True)

    def _check_reusable(self, recipe, done: Path) -> None:
        from lmlab.errors import LmlabError
        from lmlab.stages.rundir import FREE_ON_REUSE, changed_keys, saved_recipe

        hint = f"delete {recipe.run_dir} and the runs that start from it, or give the study another name"
        saved = saved_recipe(recipe.run_dir)
        changed = changed_keys(recipe, saved, FREE_ON_REUSE) if saved is not None else []
        if changed:
            raise LmlabError(f"run {recipe.name} was made by a different recipe ({', '.join(changed[:4])}"
                             + (f" and {len(changed) - 4} more" if len(changed) > 4 else "") + " changed)",
                             file=self.file, hint=hint)
        source = Path(recipe.model.from_pretrained or "") / "lmlab.json"
        if recipe.model.from_pretrained and source.is_file() and source.stat().st_mtime > done.stat().st_mtime:
            raise LmlabError(f"run {recipe.name} starts from {recipe.model.from_pretrained}, which was trained "
                             "again after it", file=self.file, hint=hint)


def mean_std_text(values: list[float], digits: int = 3) -> str:
    from lmlab.stats import mean_std

    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# Every finding's verdict follows one rule, fixed before any run: the finding defines a margin that is positive
# when the paper's claim holds, and the 95% interval of that margin (over seeds, or bootstrapped over
# checkpoints) decides. Above zero: reproduced. Below zero: not reproduced. Straddling zero, or no interval
# (one seed): inconclusive. A claim of several parts is reproduced only if every part is, and not reproduced
# if any part is not.
VERDICT_RULE = ("reproduced when the 95% interval of the margin lies above 0, not reproduced when it lies below 0, "
                "inconclusive when it straddles 0 or cannot be formed (one seed, or fits that fail)")


def margin(values: list[float], interval: tuple[float, float] | None = None) -> dict[str, float]:
    """A margin's mean and 95% interval: the t interval over seeds unless an interval is given."""
    from lmlab.stats import mean_interval, mean_std

    low, high = interval if interval is not None else mean_interval(values)
    return {"value": float(mean_std(values)[0]), "ci_low": float(low), "ci_high": float(high)}


def verdict(*margins: dict[str, float]) -> str:
    """The shared rule (VERDICT_RULE) over one or more parts of a claim."""
    import math

    parts = ["inconclusive" if math.isnan(m["ci_low"]) or math.isnan(m["ci_high"]) else
             "reproduced" if m["ci_low"] > 0 else "not reproduced" if m["ci_high"] < 0 else "inconclusive"
             for m in margins]
    if "not reproduced" in parts:
        return "not reproduced"
    return "reproduced" if all(p == "reproduced" for p in parts) else "inconclusive"


def judged(claim: str, rule: str, margins: dict[str, dict[str, float]], numbers: str) -> dict:
    """A finding as the reports print it: the claim, its margins' rule, each margin with its interval, the
    verdict, and the numbers it came from. `reproduced` stays for readers of older results."""
    outcome = verdict(*margins.values())
    return {"claim": claim, "rule": f"{rule}; {VERDICT_RULE}", "margins": margins, "verdict": outcome,
            "reproduced": outcome == "reproduced", "numbers": numbers}


def margins_text(margins: dict[str, dict[str, float]]) -> str:
    import math

    return "; ".join(f"{name} not measured (a fit that fails or leaves it unidentified)" if math.isnan(m["value"])
                     else f"{name} {m['value']:+.4f} [{m['ci_low']:+.4f}, {m['ci_high']:+.4f}]"
                     for name, m in margins.items())


def finding_line(number: int, finding: dict) -> str:
    """One finding in a report: the verdict, its margins with their intervals, the rule, then the numbers."""
    return (f"{number}. **{finding['claim']}**: {finding['verdict'].upper()}. Margins (95% interval): "
            f"{margins_text(finding['margins'])}. Rule, fixed before the run: {finding['rule']}. {finding['numbers']}")
