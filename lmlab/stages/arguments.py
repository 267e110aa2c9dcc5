"""A recipe as a training budget (steps, tokens, epochs) and as HF TrainingArguments (or a TRL config):
the same keys mean the same thing in pretraining, CPT, SFT, preference optimisation and RL."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.distributed import accelerator_available, world_size
from lmlab.errors import LmlabError
from lmlab.models.build import cuda
from lmlab.recipe import OptimConfig, Recipe, TrainConfig
from lmlab.stages.sharding import sharding_arguments
from lmlab.stages.speed import speed_arguments


@dataclass
class Budget:
    max_steps: int
    tokens_per_step: int
    tokens: int
    epochs: float | None  # passes over the unique training tokens the budget implies


def training_budget(t: TrainConfig, seq_len: int, n_params: int, train_tokens: int | None) -> Budget:
    """Optimizer steps from a budget in tokens, tokens per parameter, or steps (default: one epoch)."""
    tokens_per_step = t.micro_batch_size * t.grad_accum * world_size() * seq_len
    if t.max_steps:
        steps = t.max_steps
    elif t.tokens:
        steps = math.ceil(t.tokens / tokens_per_step)
    elif t.tokens_per_param:
        steps = math.ceil(t.tokens_per_param * n_params / tokens_per_step)
    elif t.epochs and train_tokens is not None:  # passes over the unique data (data-constrained recipes)
        steps = max(1, math.ceil(t.epochs * train_tokens / tokens_per_step))
    elif train_tokens is not None:
        steps = max(1, train_tokens // tokens_per_step)
    else:
        raise LmlabError("a streamed dataset has no known size: give a budget", field="train.tokens",
                         hint="set train.tokens, train.tokens_per_param or train.max_steps")
    tokens = steps * tokens_per_step
    epochs = tokens / train_tokens if train_tokens else None
    return Budget(steps, tokens_per_step, tokens, epochs)


def steps_over_examples(t: TrainConfig, examples: int, per_example: int = 1, epochs: float | None = None) -> int:
    """Optimizer steps for a budget over examples: train.max_steps, else `epochs` (default train.epochs, else 1)
    passes over `examples` rows (x `per_example`, e.g. an RL group), counted per epoch as the HF Trainer does."""
    if t.max_steps:
        return t.max_steps
    per_epoch = math.ceil(examples * per_example / (t.micro_batch_size * t.grad_accum * world_size()))
    return max(1, math.ceil(per_epoch * (epochs or t.epochs or 1)))


def use_bf16(precision: str) -> bool:
    import torch

    if precision == "bf16":
        return True
    return precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def scheduler_settings(o: OptimConfig, max_steps: int) -> tuple[str, dict[str, Any]]:
    """HF scheduler name and kwargs; every schedule decays fully by the last step (docs/rules.md §1)."""
    if o.schedule == "cosine":
        return "cosine_with_min_lr", {"min_lr_rate": o.min_lr_ratio}
    if o.schedule == "wsd":
        return "warmup_stable_decay", {"num_decay_steps": max(1, int(o.decay_ratio * max_steps)),
                                       "min_lr_ratio": o.min_lr_ratio}
    if o.schedule == "linear":
        return "linear", {}
    return "constant_with_warmup", {}


def training_arguments(recipe: Recipe, output_dir: Path, max_steps: int, has_validation: bool,
                       layer_class: str | None = None, args_class: Any = None, **extra: Any):
    """The recipe as HF TrainingArguments (or a TRL config class, which extends them); `extra` overrides."""
    from transformers import TrainingArguments

    o, t = recipe.optim, recipe.train
    scheduler, scheduler_kwargs = scheduler_settings(o, max_steps)
    report_to = [r for r in recipe.output.report_to if r != "tensorboard"] or "none"
    kwargs = dict(
        output_dir=str(output_dir), run_name=recipe.name, seed=recipe.seed, data_seed=recipe.seed,
        # the batch: micro-batch per device x accumulation x processes
        max_steps=max_steps, per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size, gradient_accumulation_steps=t.grad_accum,
        # the optimizer and its schedule
        learning_rate=o.lr, weight_decay=o.weight_decay, adam_beta1=o.beta1, adam_beta2=o.beta2,
        adam_epsilon=o.eps, max_grad_norm=o.grad_clip if o.grad_clip > 0 else None,
        lr_scheduler_type=scheduler, lr_scheduler_kwargs=scheduler_kwargs, warmup_steps=int(o.warmup_ratio * max_steps),
        # precision and memory
        bf16=use_bf16(t.precision), fp16=t.precision == "fp16", activation_checkpointing=t.gradient_checkpointing,
        # logging, evaluation and checkpoints (lmlab's callbacks print; HF's tqdm stays off)
        logging_steps=t.log_every, logging_first_step=True, report_to=report_to, disable_tqdm=True,
        eval_strategy="steps" if has_validation else "no", eval_steps=t.eval_every,
        save_strategy="steps", save_steps=t.save_every, save_total_limit=t.keep_last,
        # data loading and devices: CPU runs under torchrun train with DDP over gloo
        dataloader_num_workers=t.num_workers, dataloader_pin_memory=cuda(), remove_unused_columns=False,
        use_cpu=not accelerator_available(),
        ddp_timeout=t.collective_timeout,
        ddp_find_unused_parameters=recipe.model.arch in ("qwen3_moe", "mixtral"),  # routed experts may sit idle
        **sharding_arguments(t.distributed, layer_class, gpu=cuda()),
        # fused AdamW, torch.compile and Liger kernels where they help (lmlab.stages.speed)
        **speed_arguments(recipe),
        # streamed rows: each rank reads its own shards (lmlab.data.pretrain_data.streamed_rows), none is sent
        **({"accelerator_config": {"dispatch_batches": False}} if recipe.data.streaming else {}),
    )
    return (args_class or TrainingArguments)(**{**kwargs, **extra})
