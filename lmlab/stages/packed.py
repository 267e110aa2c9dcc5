"""Training on packed token rows: the job pretraining, CPT (with replay) and distillation share.

The HF Trainer is used as is, so accelerate, DDP and FSDP2 work through `torchrun`
/ `accelerate launch` unchanged. What lmlab adds lives here once: the rows (packed
with intra-document masking, replay mixed as an exact share of tokens), the budget,
the shared callbacks with MFU, and the CPT forgetting measurement (the replay
validation loss before and after). The stage runners only say what differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from lmlab.console import console
from lmlab.data.tokenizer import resolve_tokenizer
from lmlab.distributed import world_size
from lmlab.errors import LmlabError
from lmlab.models.tiled import add_tiled_head, tiling_for
from lmlab.recipe import Recipe
from lmlab.stages.arguments import Budget, training_arguments, training_budget
from lmlab.stages.common import device_peak_flops, stage_callbacks
from lmlab.stages.loop import row_losses, save_final, stage_manifest, train
from lmlab.stages.rundir import open_stage

# builds (trainer class, extra trainer kwargs) once the data exists: the distillation stage's teacher
TrainerFactory = Callable[[Any, Any, Any], tuple[type, dict[str, Any]]]


def z_loss_function(z_coef: float, vocab_size: int, aux_coef: float = 0.0):
    """Cross-entropy plus z-loss (PaLM): z_coef * mean(logsumexp(logits)^2) over target tokens.

    The penalty keeps the softmax normaliser near 1, which stabilises large-LR training.
    """
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss_fn(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits
        loss = ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch)
        shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        mask = shift != -100
        z = torch.logsumexp(logits.float(), dim=-1)[mask]
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        loss = loss + z_coef * (z.pow(2).sum() / denom)
        if getattr(outputs, "aux_loss", None) is not None:  # MoE load balancing, as the model would add it
            loss = loss + aux_coef * outputs.aux_loss.to(loss.device)
        return loss

    return loss_fn


def build_replay_data(recipe: Recipe, tokenizer, max_val_rows: int):
    """Packed replay rows (and their held-out part) for CPT; None when the recipe has no replay."""
    from lmlab.data.pretrain_data import build_packed_data, replay_block

    if not recipe.data.replay:
        return None
    if recipe.data.streaming:
        raise LmlabError("exact replay mixing needs map-style data", field="data.streaming",
                         hint="set data.streaming: false for CPT with replay")
    return build_packed_data(replay_block(recipe.data), tokenizer, recipe.seed, max_val_rows)


@dataclass
class PackedJob:
    """Everything a packed-rows run needs, built and checked, before the first step."""

    recipe: Recipe
    trainer: Any
    tokenizer: Any
    data: Any
    budget: Budget
    n_params: int
    n_active: int
    replay_mix: Any = None  # lmlab.data.pretrain_data.ReplayMix for CPT with replay


def load_rows(recipe: Recipe, tokenizer, rows: Callable | None = None):
    """(training data, collator, replay data): packed text, or what `rows` builds (distillation on chats)."""
    from transformers import default_data_collator

    from lmlab.data.pretrain_data import build_packed_data

    # eval_batches global batches: the same held-out rows whatever the number of processes
    max_val_rows = recipe.train.eval_batches * recipe.train.micro_batch_size * world_size()
    if rows is not None:
        data, collator = rows(recipe, tokenizer)
    else:
        data, collator = build_packed_data(recipe.data, tokenizer, recipe.seed, max_val_rows), default_data_collator
    return data, collator, build_replay_data(recipe, tokenizer, max_val_rows)


def print_summary(recipe: Recipe, model, tokenizer, budget: Budget, data, replay, n_params: int, n_active: int):
    out = console()
    out.print(f"[bold]{recipe.name}[/]: {type(model).__name__} with {n_params:,} parameters"
              + (f" ({n_active:,} active)" if n_active != n_params else "")
              + f", vocab {len(tokenizer):,}, seq_len {recipe.data.seq_len}")
    out.print(f"budget: {budget.max_steps:,} steps x {budget.tokens_per_step:,} tokens = {budget.tokens:,} tokens"
              f" ({budget.tokens / n_params:.1f} tokens/param)"
              + (f", {budget.epochs:.2f} epochs of {data.train_tokens:,} unique tokens"
                 if budget.epochs and not replay else ""))


def mix_in_replay(recipe: Recipe, data, replay, budget: Budget):
    """Replay rows mixed into the domain rows as an exact share of the budget's tokens, and the eval sets."""
    from lmlab.data.pretrain_data import mix_replay

    if replay is None:
        return None, data.validation
    data.train, mix = mix_replay(data.train, replay.train, budget.tokens // recipe.data.seq_len,
                                 recipe.data.replay_ratio, recipe.seed, recipe.data.seq_len)
    r = mix.report()
    console().print(f"replay mix: {r['domain_tokens']:,} domain tokens ({r['domain_epochs']:.2f} epochs) + "
                    f"{r['replay_tokens']:,} replay tokens ({r['replay_epochs']:.2f} epochs) = "
                    f"{r['replay_share']:.1%} replay")
    if replay.validation is None:
        return mix, data.validation
    sets = {"domain": data.validation, "replay": replay.validation}
    return mix, {k: v for k, v in sets.items() if v is not None}


def attach_packed_callbacks(trainer, recipe: Recipe, model, tokenizer, budget: Budget, n_active: int) -> None:
    """The shared callback set, with throughput in FLOPs (MFU) since packed rows have a known token count."""
    from lmlab.plan.compute import flops_per_token
    from lmlab.plan.params import shape_from_config

    peak = recipe.train.peak_tflops * 1e12 * world_size() if recipe.train.peak_tflops else device_peak_flops()
    try:
        flops = flops_per_token(n_active, shape_from_config(model.config.to_dict()), recipe.data.seq_len)
    except LmlabError:  # an architecture the planner does not count: train it, without an MFU figure
        flops = None
    stage_callbacks(trainer, recipe, tokenizer, budget.tokens_per_step, flops, peak)


def loss_tiling(recipe: Recipe, vocab_size: int) -> str:
    """How a packed stage tiles its loss (lmlab.models.tiled): pretraining and CPT their cross-entropy (not with
    z-loss, which needs the whole logits), distillation its own loss in lmlab's chunks."""
    tokens = recipe.train.micro_batch_size * recipe.data.seq_len
    tiling = tiling_for(recipe.train.tiled_loss, tokens, vocab_size)
    if recipe.stage == "distill":
        return "off" if tiling == "off" else "chunks"
    return "off" if recipe.stage not in ("pretrain", "cpt") or recipe.optim.z_loss else tiling


def prepare_packed(recipe: Recipe, rows: Callable | None = None, factory: TrainerFactory | None = None) -> PackedJob:
    """Tokenizer, data, model and trainer; every input check happens here, before compute."""
    from lmlab.models.build import active_parameters, build_model, count_parameters
    from lmlab.trainers import LmlabTrainer

    tokenizer = resolve_tokenizer(recipe, recipe.run_dir)
    data, collator, replay = load_rows(recipe, tokenizer, rows)
    model = build_model(recipe.model, tokenizer, seed=recipe.seed)
    n_params, n_active = count_parameters(model), active_parameters(model)
    tiling = loss_tiling(recipe, model.config.vocab_size)
    if tiling == "fused":
        add_tiled_head(model)
    ratio = recipe.data.replay_ratio if replay else 0.0
    # default budget: one pass over the domain data, with the replay share on top
    unique = data.train_tokens / (1 - ratio) if data.train_tokens else None
    budget = training_budget(recipe.train, recipe.data.seq_len, n_params, unique)
    print_summary(recipe, model, tokenizer, budget, data, replay, n_params, n_active)
    mix, evaluation = mix_in_replay(recipe, data, replay, budget)
    layer_class = next(iter(getattr(model, "_no_split_modules", None) or []), None)
    args = training_arguments(recipe, recipe.run_dir / "checkpoints", budget.max_steps, evaluation is not None,
                              layer_class=layer_class)
    compute_loss = (z_loss_function(recipe.optim.z_loss, model.config.vocab_size,
                                    getattr(model.config, "router_aux_loss_coef", 0.0))
                    if recipe.optim.z_loss else None)
    trainer_class, extra = factory(data, collator, tokenizer) if factory else (LmlabTrainer, {})
    trainer = trainer_class(model=model, args=args, train_dataset=data.train, eval_dataset=evaluation,
                            data_collator=collator, processing_class=tokenizer, compute_loss_func=compute_loss,
                            **extra)
    trainer.tiling = tiling  # distillation: "chunks" or "off", its trainer tiles its own loss
    attach_packed_callbacks(trainer, recipe, model, tokenizer, budget, n_active)
    return PackedJob(recipe, trainer, tokenizer, data, budget, n_params, n_active, mix)


class BaselineCallback(TrainerCallback):
    """Keeps the evaluation at step 0 (`eval_on_start`) as CPT's forgetting baseline.

    Why not `trainer.evaluate()` before `train()`: under DDP that call marks the model as
    prepared by accelerate without wrapping it, so `train()` then skips the DDP wrapper and
    every rank steps on its own gradients. `eval_on_start` evaluates inside the training
    loop, on the model the loop wraps.
    """

    def __init__(self, path: Path):
        self.path, self.metrics = path, {}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        from lmlab.distributed import is_main
        from lmlab.paths import write_json_atomic

        if state.global_step == 0:  # one call per evaluation set (domain, replay)
            self.metrics.update(metrics or {})
            if is_main():
                write_json_atomic(self.path, self.metrics)


def forgetting_baseline(job: PackedJob, start) -> BaselineCallback | None:
    """CPT's general (replay) validation loss before any update, measured once at step 0 and kept in the run
    directory, so a resumed run still reports forgetting against the model it started from."""
    if job.replay_mix is None:
        return None
    saved = job.recipe.run_dir / "metrics_before.json"
    baseline = BaselineCallback(saved)
    if saved.is_file():
        baseline.metrics = json.loads(saved.read_text())
    elif start is not None:  # a checkpoint from before this file existed: the baseline is lost, say so
        console().print("[yellow]no forgetting baseline was saved before this checkpoint[/]")
    else:
        job.trainer.args.eval_on_start = True
        job.trainer.add_callback(baseline)
    return baseline


def run_packed(recipe: Recipe, resume: bool, overwrite: bool, rows: Callable | None = None,
               factory: TrainerFactory | None = None, checked=None) -> Path:
    """Open, prepare, train and close a packed-rows stage; returns the final artifact directory."""
    start = open_stage(recipe, resume, overwrite, checked=checked)
    job = prepare_packed(recipe, rows, factory)
    out, trainer = console(), job.trainer
    baseline = forgetting_baseline(job, start)
    train(trainer, start)
    before = baseline.metrics if baseline is not None else {}
    final_metrics = trainer.evaluate() if trainer.eval_dataset is not None else {}
    held_out = trainer.eval_dataset.get("domain") if isinstance(trainer.eval_dataset, dict) else trainer.eval_dataset
    rows_loss = row_losses(trainer, held_out) if held_out is not None else None
    manifest = stage_manifest(
        recipe, parameters=job.n_params, active_parameters=job.n_active, steps=job.budget.max_steps,
        tokens=job.budget.tokens, epochs=job.budget.epochs, unique_train_tokens=job.data.train_tokens,
        metrics=final_metrics, validation_rows=rows_loss.as_dict() if rows_loss is not None else None,
        loss_tiling=trainer.tiling)
    if job.replay_mix is not None:
        manifest.update(replay_mix=job.replay_mix.report(), metrics_before=before)
        if "eval_replay_loss" in before and "eval_replay_loss" in final_metrics:
            out.print(f"general (replay) validation loss: {before['eval_replay_loss']:.4f} before, "
                      f"{final_metrics['eval_replay_loss']:.4f} after")
    final = save_final(trainer, job.tokenizer, recipe.run_dir / "final", manifest)
    if "eval_loss" in final_metrics:
        out.print(f"validation loss {final_metrics['eval_loss']:.4f}")
    out.print(f"[bold green]HF checkpoint:[/] {final}")
    return final
