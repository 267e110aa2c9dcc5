"""Training stages; `run_stage` is the one dispatch from a validated recipe to its stage's runner."""

from __future__ import annotations

from pathlib import Path

STAGE_RUNNERS = {  # stage -> (module, function); imported only when that stage runs
    "pretrain": ("lmlab.stages.pretrain", "run_pretrain"), "cpt": ("lmlab.stages.pretrain", "run_pretrain"),
    "sft": ("lmlab.stages.sft", "run_sft"), "rm": ("lmlab.stages.reward_model", "run_reward_model"),
    "dpo": ("lmlab.stages.preference", "run_preference"), "kto": ("lmlab.stages.preference", "run_preference"),
    "orpo": ("lmlab.stages.preference", "run_preference"), "rl": ("lmlab.stages.rl", "run_rl"),
    "distill": ("lmlab.stages.pretrain", "run_pretrain"),
}


def run_stage(recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Run a validated recipe with its stage's runner (imported only now: torch is heavy)."""
    import importlib

    from lmlab.console import silence_libraries

    silence_libraries()
    module, function = STAGE_RUNNERS[recipe.stage]
    return getattr(importlib.import_module(module), function)(recipe, resume=resume, overwrite=overwrite)
