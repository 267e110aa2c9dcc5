"""Training stages; `run_stage` is the one dispatch from a validated recipe to its stage's runner.

Each stage's module is imported only when that stage runs (torch and TRL are heavy),
but by name, so a reader (or a tool) can follow a recipe from the CLI to its trainer.
"""

from __future__ import annotations

from pathlib import Path


def run_stage(recipe, resume: bool = False, overwrite: bool = False, force: bool = False, checked=None) -> Path:
    """Check every input, hold the run directory's lock, and run the recipe with its stage's runner;
    returns the stage's final artifact. `force` lets `--resume` continue after a change to the recipe;
    `checked` is what a pipeline's preflight already established (stages.preflight.Checked)."""
    from dataclasses import replace

    from lmlab.console import silence_libraries
    from lmlab.paths import run_lock
    from lmlab.stages.preflight import Checked, check_inputs

    from lmlab.distributed import report

    silence_libraries()
    report(stage=recipe.name, step=None)  # where this rank is, should the launch fail
    # before the run directory (and its lock) is created, let alone overwritten
    checked = check_inputs(recipe, checked=replace(checked or Checked(), force=force))
    if resume:
        from lmlab.stages.rundir import check_resume

        check_resume(recipe, force=force)
    with run_lock(recipe.run_dir):
        return _runner(recipe.stage)(recipe, resume=resume, overwrite=overwrite, checked=checked)


def _runner(stage: str):
    """The stage's runner, imported by name (torch and TRL load only now)."""
    if stage in ("pretrain", "cpt"):
        from lmlab.stages.pretrain import run_pretrain as runner
    elif stage == "distill":
        from lmlab.stages.distill import run_distill as runner
    elif stage == "sft":
        from lmlab.stages.sft import run_sft as runner
    elif stage == "rm":
        from lmlab.stages.rm import run_reward_model as runner
    elif stage in ("dpo", "kto", "orpo"):
        from lmlab.stages.preference import run_preference as runner
    elif stage == "rl":
        from lmlab.stages.rl import run_rl as runner
    else:  # the recipe's Literal makes this unreachable for a validated recipe
        raise ValueError(f"no runner for stage {stage!r}")
    return runner
