"""What lmlab adds to every HF / TRL trainer, as one small mixin.

Why a subclass at all: the HF Trainer writes a checkpoint in place, so a kill
during a save leaves a half-written `checkpoint-N` that `--resume` would pick up;
and it applies weight decay to embeddings, which the Smol Training Playbook says
not to. Both are fixed here, for every stage, by mixing this class into the
stage's trainer through `lmlab_trainer(SFTTrainer)`, the one factory for them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from transformers import Trainer

from lmlab.paths import fsync_tree, remove_tree

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
    remove_tree(Path(checkpoint_dir) / STAGING, Path(checkpoint_dir))


class LmlabTrainerMixin:
    """Atomic checkpoints (write to a staging dir, fsync, rename) and no decay on embeddings.

    Under several processes every rank writes its part of a checkpoint (its RNG state, its
    shards) into the staging dir; rank 0 renames it only after all ranks are done, and no rank
    starts the next save before the rename, so a checkpoint is never renamed half-written.
    """

    _staging_save = False
    guard = None  # lmlab.callbacks.DivergenceGuard, set by the stage skeleton
    muon = None  # the recipe's optim block when optim.optimizer is muon, set by the stage skeleton
    lr_scale = 1.0  # applied to a resumed optimizer and schedule: a rollback lowers the LR
    _step_loss = 0.0

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_loss = self._step_loss + loss.detach()  # this optimizer step's loss, over its micro-batches
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """After clipping, before the optimizer step: where the divergence guard may drop this step's update."""
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss, self._step_loss = float(self._step_loss), 0.0
        if self.guard is not None and self._agreed_skip(loss, float(norm)):
            for param in model.parameters():  # no gradient, no update: AdamW leaves these parameters alone
                param.grad = None
        return norm

    def _agreed_skip(self, loss: float, norm: float) -> bool:
        """Every rank decides on the same numbers: the loss is averaged, the (already reduced) norm shared."""
        import torch

        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(torch.tensor([loss, norm], device=self.accelerator.device), "mean")
            loss, norm = (float(v) for v in values)
        return self.guard.skip_step(loss, norm)

    def create_optimizer(self, model=None):
        """`optim.optimizer: muon`: Muon for the hidden matrices and AdamW for the rest (lmlab.optimizers),
        with the same no-decay groups as AdamW; every other name is the Trainer's own."""
        if self.muon is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from lmlab.optimizers import build_muon

        opt_model = self.model if model is None else model
        self.optimizer = build_muon(opt_model, self.muon, set(self.get_decay_parameter_names(opt_model)))
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.lr_scale == 1.0:
            return
        for group in self.optimizer.param_groups:
            group["lr"] *= self.lr_scale
            if "initial_lr" in group:
                group["initial_lr"] *= self.lr_scale
        self.lr_scheduler.base_lrs = [lr * self.lr_scale for lr in self.lr_scheduler.base_lrs]
        if getattr(self.lr_scheduler, "_last_lr", None):  # what is logged until the schedule steps again
            self.lr_scheduler._last_lr = [lr * self.lr_scale for lr in self.lr_scheduler._last_lr]

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging_save else out

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        if self.guard is not None and self.guard.bad_in_a_row:  # never checkpoint weights the guard distrusts:
            return  # a rollback must land on a healthy state (every rank sees the same guard decisions)

        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_save = True
        try:
            staging_root = Path(self._get_output_dir(trial))
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_save = False
        self.accelerator.wait_for_everyone()  # every rank's files are in the staging dir
        run_dir = Path(self._get_output_dir(trial))
        best = self.state.best_model_checkpoint
        renamed_best = bool(best and Path(best).parent == staging_root)
        if renamed_best:  # the best model is this checkpoint, under its final name (on every rank)
            self.state.best_model_checkpoint = str(run_dir / Path(best).name)
        if self.args.should_save:
            self._commit_checkpoint(staging_root / name, run_dir / name, renamed_best)
        self.accelerator.wait_for_everyone()  # the rename is done before any rank saves again

    def _commit_checkpoint(self, staged: Path, final: Path, renamed_best: bool) -> None:
        """Rank 0: fsync the staged checkpoint, rename it into place, rotate old ones."""
        run_dir = final.parent
        if renamed_best:
            self.state.save_to_json(str(staged / "trainer_state.json"))
        fsync_tree(staged)
        remove_tree(final, run_dir)
        os.replace(staged, final)
        remove_tree(staged.parent, run_dir)
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
            remove_tree(path, run_dir)

    def get_decay_parameter_names(self, model):
        from lmlab.optimizers import embedding_weight_ids

        names = super().get_decay_parameter_names(model)
        embeddings = embedding_weight_ids(model)
        excluded = {n for n, p in model.named_parameters() if id(p) in embeddings}
        return [n for n in names if n not in excluded]


class LmlabTrainer(LmlabTrainerMixin, Trainer):
    """The HF Trainer with lmlab's checkpoints and decay groups (pretraining and CPT).

    Its one change to the loss: with `tiling` (train.tiled_loss, lmlab.models.tiled) the loss of a
    batch with labels is computed in tiles, by TRL's fused LM head ("fused") or by lmlab's
    checkpointed chunks ("chunks"); either is the model's own cross-entropy, divided by the
    Trainer's token count like the model's."""

    tiling = "off"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.tiling == "off" or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if self.tiling == "fused":
            return super().compute_loss(model, {**inputs, "fused_lm_head": True}, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from lmlab.models.tiled import chunked_cross_entropy

        labels = inputs["labels"]
        loss = self.over_global_tokens(chunked_cross_entropy(model, {k: v for k, v in inputs.items() if k != "labels"},
                                                             labels, num_items_in_batch), num_items_in_batch)
        return (loss, {}) if return_outputs else loss  # no logits: the evaluation asks for the loss only

    def over_global_tokens(self, loss, num_items_in_batch):
        """A loss already divided by the step's token count over every rank, scaled as the Trainer scales the
        model's own: DDP averages gradients over ranks, so each rank's share is multiplied back."""
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            return loss * self.accelerator.num_processes
        return loss


@functools.lru_cache(maxsize=None)
def lmlab_trainer(base: type) -> type:
    """`base` (an HF or TRL trainer class) with lmlab's checkpoints and decay groups, made once per class."""
    return type(f"Lmlab{base.__name__}", (LmlabTrainerMixin, base),
                {"__doc__": f"{base.__name__} with lmlab's atomic checkpoints and decay groups."})
