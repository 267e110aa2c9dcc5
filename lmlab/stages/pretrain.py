"""Pretraining and continued pretraining (CPT with an exact share of replay) on the HF Trainer.

Both train on packed rows (`lmlab.stages.packed`): pretraining from a fresh model
built from `model`, CPT from `model.from_pretrained` with `data.replay` mixed in as
an exact `data.replay_ratio` of the tokens (EvoLM: 16%), its forgetting measured as
the replay validation loss before and after.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.recipe import Recipe
from lmlab.stages.packed import run_packed


def run_pretrain(recipe: Recipe, resume: bool = False, overwrite: bool = False, checked=None) -> Path:
    """Pretrain (or continue pretraining) as the recipe says; returns the final artifact directory."""
    return run_packed(recipe, resume, overwrite, checked=checked)
