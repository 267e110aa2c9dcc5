"""What lmlab adds to every HF / TRL trainer, as one small mixin.

Why a subclass at all: the HF Trainer writes a checkpoint in place, so a kill
during a save leaves a half-written `checkpoint-N` that `--resume` would pick up;
and it applies weight decay to embeddings, which the Smol Training Playbook says
not to. Both are fixed here, for every stage, by mixing this class into the
stage's trainer (`class X(LmlabTrainerMixin, SFTTrainer)`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from transformers import Trainer

STAGING = ".staging"
CHECKPOINT_PREFIX = "checkpoint-"


def last_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; staging leftovers from a killed save are never returned."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    steps = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in root.iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()
             and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def remove_staging(checkpoint_dir: str | Path) -> None:
    """Drop what a killed save left behind, before a run (re)starts."""
    shutil.rmtree(Path(checkpoint_dir) / STAGING, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


class LmlabTrainerMixin:
    """Atomic checkpoints (write to a staging dir, fsync, rename) and no decay on embeddings."""

    _staging_save = False

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging_save else out

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_save = True
        try:
            staging_root = Path(self._get_output_dir(trial))
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_save = False
        if not self.args.should_save:
            return
        run_dir = Path(self._get_output_dir(trial))
        staged, final = staging_root / name, run_dir / name
        _fsync_tree(staged)
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staging_root:  # the best model is this checkpoint, under its final name
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
            self.state.save_to_json(str(staged / "trainer_state.json"))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)
        shutil.rmtree(staging_root, ignore_errors=True)
        self._rotate(run_dir)

    def _rotate(self, run_dir: Path) -> None:
        """Keep the newest `save_total_limit` checkpoints."""
        limit = self.args.save_total_limit
        if not limit:
            return
        done = sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in run_dir.iterdir()
                      if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit())
        best = self.state.best_model_checkpoint
        for _, path in done[:-limit]:
            if best and path == Path(best):  # early stopping reloads it at the end
                continue
            shutil.rmtree(path, ignore_errors=True)

    def get_decay_parameter_names(self, model):
        names = super().get_decay_parameter_names(model)
        embeddings = {id(model.get_input_embeddings().weight)}
        output = model.get_output_embeddings()
        if output is not None:
            embeddings.add(id(output.weight))
        excluded = {n for n, p in model.named_parameters() if id(p) in embeddings}
        return [n for n in names if n not in excluded]


class LmlabTrainer(LmlabTrainerMixin, Trainer):
    """The HF Trainer with lmlab's checkpoints and decay groups (pretraining and CPT)."""
