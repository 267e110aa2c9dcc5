"""The one place a stage trains (with the divergence guard's rollbacks), the per-row validation loss, and
the final save every rank hands its weights to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.distributed import main_first
from lmlab.errors import LmlabError


def train(trainer, start: Path | None) -> None:
    """The one place a stage's trainer trains (from `start` when resuming), with the guard's rollbacks.

    When the divergence guard asks, training restarts from the last complete checkpoint (or the
    weights it began with) at a lower LR; after `train.guard.rollbacks` of them the run stops.
    """
    guard = getattr(trainer, "guard", None)
    initial = _initial_weights(trainer) if guard is not None and start is None else None
    for rollback in range(guard.config.rollbacks + 1 if guard is not None else 1):
        trainer.train(resume_from_checkpoint=str(start) if start else None)
        if guard is None or not guard.rollback_requested:
            return
        if rollback == guard.config.rollbacks:
            break
        start = _roll_back(trainer, guard, initial)
    raise LmlabError(f"training diverged: {guard.config.patience} bad steps in a row even after "
                     f"{guard.config.rollbacks} rollbacks with a lower LR, so no model is saved",
                     file=str(trainer.args.output_dir), field="optim.lr",
                     hint="lower optim.lr, raise optim.warmup_ratio, or see the guard/ events in metrics.jsonl")


def _sharded(trainer) -> bool:
    """Weights split across ranks (FSDP or DeepSpeed ZeRO): a full copy needs a gather or a checkpoint."""
    return getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)


def _initial_weights(trainer) -> dict | None:
    """A CPU copy of the weights training starts from, the rollback point before any checkpoint exists
    (not under FSDP / ZeRO, whose shards only a checkpoint can restore)."""
    if _sharded(trainer):
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in trainer.model.state_dict().items()}


def _roll_back(trainer, guard, initial: dict | None) -> Path | None:
    """Lower the LR and return the checkpoint to resume from (None: the initial weights, restored here)."""
    from lmlab.trainers import last_checkpoint

    trainer.lr_scale *= guard.config.lr_factor
    start = last_checkpoint(trainer.args.output_dir)
    if start is None:
        if initial is None:
            raise LmlabError("training diverged before the first checkpoint, and sharded weights cannot be "
                             "restored without one", file=str(trainer.args.output_dir), field="train.save_every",
                             hint="save a checkpoint earlier, or lower optim.lr")
        trainer.model.load_state_dict(initial)
        trainer.optimizer = trainer.lr_scheduler = None  # fresh ones, at the lowered LR
        trainer.args.learning_rate *= guard.config.lr_factor
        trainer.lr_scale = 1.0  # already in the arguments
    guard.log({"guard/event": "rollback", "guard/to": str(start or "initial weights"),
               "guard/lr": float(f"{trainer.args.learning_rate * trainer.lr_scale:.6g}")})
    return start


def row_losses(trainer, dataset, collator=None) -> Any:
    """Each held-out row's summed next-token loss and its token count, gathered over ranks in row order: the
    validation loss as an Estimate whose items a paired comparison of two runs resamples (`lmlab sweep` moves
    only to a configuration better beyond that noise; SFT's replay rows measure forgetting). `collator`
    replaces the trainer's, for rows of another kind than it trains on (general windows in SFT).

    Not `trainer.evaluate()`: before `train()` that call leaves a DDP model unwrapped (packed.BaselineCallback).
    """
    import torch

    from lmlab.models.tiled import row_token_logprobs
    from lmlab.stats import Estimate

    model = trainer.model_wrapped
    was_training = model.training
    model.eval()
    sums: list[float] = []
    counts: list[float] = []
    if collator is None:
        batches = trainer.get_eval_dataloader(dataset)
    else:
        batches = trainer.accelerator.prepare(torch.utils.data.DataLoader(
            dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=collator))
    for batch in batches:
        labels = batch.pop("labels")
        with torch.no_grad():
            nll = -row_token_logprobs(model, batch, labels)  # in tiles when the model has the tiled head
        mask = labels[:, 1:] != -100
        total, n = trainer.accelerator.gather_for_metrics((nll.sum(1), mask.sum(1)))
        sums += total.tolist()
        counts += n.tolist()
    model.train(was_training)
    return Estimate(sums, counts, binary=False)


def stage_manifest(recipe, **fields: Any) -> dict[str, Any]:
    """What every artifact's lmlab.json says of its run (stage, name, resolved recipe, the model it started
    from), then the stage's own fields."""
    return {"stage": recipe.stage, "name": recipe.name, "recipe": recipe.model_dump(mode="json"),
            "input_artifact": recipe.model.from_pretrained, **fields}


def save_final(trainer, tokenizer, out_dir: Path, manifest: dict[str, Any], model=None) -> Path:
    """Every rank hands over its weights; rank 0 writes the artifact; all ranks wait until it exists.

    `model` replaces the trainer's model (e.g. a merged LoRA policy). Under FSDP or ZeRO-3 the
    full state dict is gathered first, so `final/` is always a plain HF checkpoint.
    """
    from lmlab.artifacts import save_artifact

    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if _sharded(trainer) and model is None \
        else None
    if model is None:
        model = trainer.accelerator.unwrap_model(trainer.model)
    with main_first() as main:  # a failed save (a diverged model, a full disk) stops every rank
        if main:
            save_artifact(model, tokenizer, out_dir, manifest, state_dict=state_dict)
    if not (out_dir / "config.json").is_file() and not (out_dir / "adapter_config.json").is_file():
        raise LmlabError("the final artifact was not written", file=str(out_dir),
                         hint="rank 0 failed to save it: see its log")
    return out_dir
