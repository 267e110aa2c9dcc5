"""What every study shares: recipe trees merged over the study's base, validated before compute, run
in-process through the same stage runners as `lmlab run`, and reused once finished."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from lmlab.recipe import merge_blocks


def load_study(path: str | Path, model: type[BaseModel]):
    """The study file validated by its pydantic model; errors name file, line and field."""
    from lmlab.loading import read_yaml, validate_recipe

    tree, root = read_yaml(path, "study")
    return validate_recipe(tree, str(path), root, model=model)


class StudyRunner:
    """Runs stage recipe trees under `<study dir>/runs/<name>/`; a run with a final artifact is not run again."""

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

        if (self.final(tree["name"]) / "lmlab.json").is_file():
            return self.final(tree["name"])
        return run_stage(self.validate(tree), overwrite=True)


def mean_std_text(values: list[float], digits: int = 3) -> str:
    from lmlab.stats import mean_std

    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
