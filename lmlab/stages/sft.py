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
from lmlab.stages.posttrain import (ChatReplay, SFTData, fine_tuning_lr, load_policy, load_sft_data, lora_config,
                                    mix_chat_replay, prepare_tokenizer)

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
    replay: ChatReplay | None = None  # general text mixed in (data.replay), with its held-out rows


def sft_arguments(recipe: Recipe, data: SFTData, model, epochs: float | None):
    """TRL's SFTConfig from the recipe: epochs or a step budget, early stopping, warmup over the real steps."""
    from trl import SFTConfig

    from lmlab.stages.arguments import training_arguments, training_budget

    has_val = data.validation is not None
    patience = recipe.sft.early_stopping_patience if has_val else None
    # assistant-only loss: the records arrive tokenised with their masks (SFTData.assistant_mask), which TRL
    # turns into labels itself; its own template-based masking stays off
    extra: dict[str, Any] = dict(max_length=recipe.data.seq_len, assistant_only_loss=False,
                                 packing=recipe.sft.packing, include_num_input_tokens_seen="non_padding",
                                 dataset_num_proc=None)
    if patience:
        extra.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
                     save_steps=recipe.train.eval_every)
    if epochs is not None:  # the Trainer counts steps from epochs
        extra.update(num_train_epochs=epochs)
        max_steps = -1
    else:  # a budget in steps, tokens or tokens per parameter (tokens count padded rows of data.seq_len)
        from lmlab.models.build import count_parameters

        max_steps = training_budget(recipe.train, recipe.data.seq_len, count_parameters(model), None).max_steps
    extra["learning_rate"] = fine_tuning_lr(recipe, model, from_previous=False)
    args = training_arguments(recipe, recipe.run_dir / "checkpoints", max_steps, has_val, args_class=SFTConfig,
                              **extra)
    if epochs is not None:
        schedule_over(args, recipe, data.examples, epochs)
    return args, patience


def schedule_over(args, recipe: Recipe, rows: int, epochs: float) -> None:
    """Warmup (and WSD's decay) as a share of the real number of steps over `rows` training rows (packed
    rows are fewer than records; replay rows add to them)."""
    from lmlab.stages.arguments import steps_over_examples

    steps = steps_over_examples(recipe.train, rows, epochs=epochs)
    args.warmup_steps = int(recipe.optim.warmup_ratio * steps)
    if recipe.optim.schedule == "wsd":
        args.lr_scheduler_kwargs["num_decay_steps"] = max(1, int(recipe.optim.decay_ratio * steps))


def check_truncation(trainer, data: SFTData, seq_len: int, packed: bool) -> None:
    """TRL drops samples whose truncation to seq_len leaves no loss token (a prompt that fills the
    window): say how many, and refuse a run that would have nothing to train on."""
    from lmlab.errors import LmlabError

    kept = len(trainer.train_dataset)
    if kept == 0:
        raise LmlabError(f"no training record keeps an assistant token within data.seq_len={seq_len} "
                         f"({data.overlong:,} of {data.examples:,} are longer)", field="data.seq_len",
                         hint="raise data.seq_len, or shorten the prompts")
    if kept < data.examples and not packed:  # packed rows are not records
        console().print(f"[yellow]{data.examples - kept:,} records have no assistant token within "
                        f"data.seq_len={seq_len} and are left out[/]")


def prepare_sft(recipe: Recipe) -> SFTJob:
    """Records, tokenizer, model and trainer; every input check happens here, before compute."""
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    from lmlab.distributed import world_size
    from lmlab.stages.common import stage_callbacks
    from lmlab.trainers import lmlab_trainer

    tokenizer = prepare_tokenizer(recipe)
    data = load_sft_data(recipe, tokenizer)
    console().print(f"SFT on {data.examples:,} conversations ({len(data.validation or [])} held out); "
                    + (f"{data.dropped} longer than {recipe.data.seq_len} tokens dropped" if data.dropped
                       else f"{data.overlong} longer than {recipe.data.seq_len} tokens truncated"))
    model = load_policy(recipe, tokenizer)
    epochs = sft_epochs(recipe, data.examples)
    peft_config = lora_config(recipe, data.examples, model) if recipe.lora.enabled else None
    args, patience = sft_arguments(recipe, data, model, epochs)
    callbacks = [EarlyStoppingCallback(early_stopping_patience=patience)] if patience else []
    trainer = lmlab_trainer(SFTTrainer)(model=model, args=args, train_dataset=data.train,
                                        eval_dataset=data.validation, processing_class=tokenizer,
                                        peft_config=peft_config, callbacks=callbacks)
    check_truncation(trainer, data, recipe.data.seq_len, recipe.sft.packing)
    replay = mix_chat_replay(recipe, trainer, tokenizer)
    if epochs is not None:  # the rows TRL prepared (and replay joined) are what the steps run over
        schedule_over(trainer.args, recipe, len(trainer.train_dataset), epochs)
    t = recipe.train
    stage_callbacks(trainer, recipe, tokenizer, t.micro_batch_size * t.grad_accum * world_size() * recipe.data.seq_len)
    return SFTJob(recipe, trainer, tokenizer, data, epochs, replay)


def general_loss_before(job: SFTJob, start) -> dict[str, float]:
    """The replay (general) validation loss of the model SFT starts from, measured once before the first
    step and kept in the run directory, so a resumed run still reports forgetting against its start."""
    import json

    from transformers import default_data_collator

    from lmlab.distributed import is_main
    from lmlab.paths import write_json_atomic
    from lmlab.stages.loop import row_losses

    if job.replay is None or job.replay.validation is None:
        return {}
    saved = job.recipe.run_dir / "metrics_before.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    if start is not None:
        console().print("[yellow]no forgetting baseline was saved before this checkpoint[/]")
        return {}
    before = {"eval_replay_loss": float(row_losses(job.trainer, job.replay.validation, default_data_collator))}
    if is_main():
        write_json_atomic(saved, before)
    return before


def run_sft(recipe: Recipe, resume: bool = False, overwrite: bool = False, checked=None) -> Path:
    """Fine-tune as the recipe says; returns the artifact (a full checkpoint, or a LoRA adapter)."""
    from lmlab.stages.loop import save_final, stage_manifest, train
    from lmlab.stages.rundir import open_stage

    start = open_stage(recipe, resume, overwrite, checked=checked)
    job = prepare_sft(recipe)
    out, trainer, tokenizer, data, run_dir = console(), job.trainer, job.tokenizer, job.data, recipe.run_dir
    has_val, epochs = data.validation is not None, job.epochs
    before = general_loss_before(job, start)
    train(trainer, start)
    final_metrics = trainer.evaluate() if has_val else {}
    if job.replay is not None and job.replay.validation is not None:
        from transformers import default_data_collator

        from lmlab.stages.loop import row_losses

        final_metrics["eval_replay_loss"] = float(row_losses(trainer, job.replay.validation, default_data_collator))
        if "eval_replay_loss" in before:
            out.print(f"general (replay) validation loss: {before['eval_replay_loss']:.4f} before, "
                      f"{final_metrics['eval_replay_loss']:.4f} after")
    if recipe.sft.eval_math:  # every rank scores its share of the problems; the manifest is rank 0's to write
        from lmlab.evaluate.evaluator import evaluate
        from lmlab.evaluate.tasks import load_task

        tasks = [load_task(name, recipe.sft.eval_math) for name in ("math_id", "math_ood")]
        final_metrics.update(evaluate(trainer.model, tokenizer, tasks))
        out.print(f"greedy math accuracy: in-domain {final_metrics['math_id/greedy_accuracy']:.1%}, "
                  f"out-of-domain {final_metrics['math_ood/greedy_accuracy']:.1%} "
                  f"({recipe.sft.eval_math} problems each)")
    manifest = stage_manifest(recipe, examples=data.examples, overlong=data.overlong, dropped=data.dropped,
                              epochs=epochs, assistant_mask=data.assistant_mask, steps=trainer.state.global_step,
                              adapter=recipe.lora.enabled, metrics=final_metrics)
    if job.replay is not None:
        manifest.update(replay_mix=job.replay.report, metrics_before=before)
    final = save_final(trainer, tokenizer, run_dir / "final", manifest)
    out.print(f"[bold green]{'LoRA adapter' if recipe.lora.enabled else 'HF checkpoint'}:[/] {final}"
                  + ("  (merge it with `lmlab export`)" if recipe.lora.enabled else ""))
    return final
