"""Supervised fine-tuning on TRL's SFTTrainer, with LoRA / QLoRA through peft.

lmlab adds what TRL leaves to the user: records converted and checked before
compute, the training chat template (generation markers for assistant-only loss),
overlong samples counted, a held-out split with early stopping, default epochs
from the dataset-size rule with the EvoLM ID/OOD warning, the shared callbacks,
atomic checkpoints and the artifact format.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.console import console
from lmlab.recipe import Recipe
from lmlab.stages.posttrain import SFTData, load_policy, load_sft_data, lora_config, prepare_tokenizer

def sft_epochs(recipe: Recipe, examples: int) -> float | None:
    """Epochs from the recipe, else the dataset-size rule; warns outside EvoLM's 2-4 window."""
    from lmlab.plan.rules import default_sft_epochs, sft_epoch_warning

    t = recipe.train
    if t.max_steps or t.tokens or t.tokens_per_param:
        return None
    epochs = t.epochs or default_sft_epochs(examples)
    advice = sft_epoch_warning(epochs)
    if advice:
        warnings.warn(f"{advice.message}: {advice.reason} ({advice.source})", stacklevel=2)
    return epochs


@dataclass
class SFTJob:
    recipe: Recipe
    trainer: Any
    tokenizer: Any
    data: SFTData
    epochs: float | None


def prepare_sft(recipe: Recipe) -> SFTJob:
    """Records, tokenizer, model and trainer; every input check happens here, before compute."""
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    from lmlab.callbacks import MetricsCallback, RichProgressCallback, attach_callbacks
    from lmlab.distributed import world_size
    from lmlab.stages.common import task_eval_callbacks, training_arguments
    from lmlab.trainers import LmlabTrainerMixin

    class LmlabSFTTrainer(LmlabTrainerMixin, SFTTrainer):
        """TRL's SFTTrainer with lmlab's atomic checkpoints and decay groups."""

    run_dir = recipe.run_dir
    tokenizer = prepare_tokenizer(recipe)
    data = load_sft_data(recipe, tokenizer)
    console().print(f"SFT on {data.examples:,} conversations ({len(data.validation or [])} held out); "
                  f"{data.overlong} longer than {recipe.data.seq_len} tokens "
                  + ("dropped" if data.dropped else "truncated"))
    model = load_policy(recipe, tokenizer)
    epochs = sft_epochs(recipe, data.examples)
    peft_config = lora_config(recipe, data.examples, model) if recipe.lora.enabled else None

    has_val = data.validation is not None
    patience = recipe.sft.early_stopping_patience if has_val else None
    t = recipe.train
    extra: dict[str, Any] = dict(
        max_length=recipe.data.seq_len, assistant_only_loss=recipe.sft.assistant_only_loss,
        packing=recipe.sft.packing, include_num_input_tokens_seen="non_padding",
        dataset_num_proc=None,
    )
    if epochs is not None:
        extra.update(num_train_epochs=epochs)
    if patience:
        extra.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                     save_steps=t.eval_every)
    if epochs is not None:
        max_steps = -1  # the Trainer counts steps from epochs
    else:  # a budget in steps, tokens or tokens per parameter (tokens count padded rows of data.seq_len)
        from lmlab.models.build import count_parameters
        from lmlab.stages.common import training_budget

        max_steps = training_budget(recipe, count_parameters(model), None).max_steps
    args = training_arguments(recipe, run_dir / "checkpoints", max_steps, has_val, args_class=SFTConfig, **extra)
    if epochs is not None:  # warmup as a share of the real number of steps
        steps = -(-data.examples // (t.micro_batch_size * t.grad_accum * world_size())) * epochs
        args.warmup_steps = int(recipe.optim.warmup_ratio * steps)
        if recipe.optim.schedule == "wsd":
            args.lr_scheduler_kwargs["num_decay_steps"] = max(1, int(recipe.optim.decay_ratio * steps))
    callbacks = [EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []
    trainer = LmlabSFTTrainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.validation,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    metrics = MetricsCallback(run_dir, t.micro_batch_size * t.grad_accum * world_size() * recipe.data.seq_len,
                              stage="sft", tensorboard="tensorboard" in recipe.output.report_to)
    attach_callbacks(trainer, [metrics, RichProgressCallback(recipe.name),
                               *task_eval_callbacks(recipe, metrics, tokenizer)])
    return SFTJob(recipe, trainer, tokenizer, data, epochs)


def run_sft(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> Path:
    """Fine-tune as the recipe says; returns the artifact (a full checkpoint, or a LoRA adapter)."""
    from lmlab.distributed import is_main
    from lmlab.stages.common import open_stage, save_final, train

    start = open_stage(recipe, resume, overwrite)
    job = prepare_sft(recipe)
    out, trainer, tokenizer, data, run_dir = console(), job.trainer, job.tokenizer, job.data, recipe.run_dir
    has_val, epochs = data.validation is not None, job.epochs
    train(trainer, start)
    final_metrics = trainer.evaluate() if has_val else {}
    if recipe.sft.eval_math and is_main():  # rank 0 measures; the manifest is its to write
        from lmlab.evaluate.evaluator import evaluate
        from lmlab.evaluate.tasks import load_task

        tasks = [load_task(name, recipe.sft.eval_math) for name in ("math_id", "math_ood")]
        final_metrics.update(evaluate(trainer.model, tokenizer, tasks))
        out.print(f"greedy math accuracy: in-domain {final_metrics['math_id/greedy_accuracy']:.1%}, "
                  f"out-of-domain {final_metrics['math_ood/greedy_accuracy']:.1%} "
                  f"({recipe.sft.eval_math} problems each)")
    manifest = {"stage": "sft", "name": recipe.name, "recipe": recipe.model_dump(mode="json"),
                "input_artifact": recipe.model.from_pretrained, "examples": data.examples,
                "overlong": data.overlong, "dropped": data.dropped, "epochs": epochs,
                "steps": trainer.state.global_step, "adapter": recipe.lora.enabled, "metrics": final_metrics}
    final = save_final(trainer, tokenizer, run_dir / "final", manifest)
    out.print(f"[bold green]{'LoRA adapter' if recipe.lora.enabled else 'HF checkpoint'}:[/] {final}"
                  + ("  (merge it with `lmlab export`)" if recipe.lora.enabled else ""))
    return final
