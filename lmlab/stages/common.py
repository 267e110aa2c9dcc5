"""What every training stage shares: the run directory, the budget, HF training arguments, devices.

Stages differ in their data and trainer class; everything here is the same for all
of them, so a recipe key means the same thing in pretraining, CPT and SFT.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.console import console
from lmlab.distributed import accelerator_available, barrier, is_main, main_first, world_size
from lmlab.errors import LmlabError
from lmlab.models.build import cuda
from lmlab.paths import remove_run_dir
from lmlab.recipe import OptimConfig, Recipe, TrainConfig
from lmlab.loading import dump_recipe
from lmlab.stages.sharding import sharding_arguments
from lmlab.stages.speed import speed_arguments


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, root: Path) -> None:
    """Refuse to mix two runs in one directory unless the user says resume or overwrite."""
    from lmlab.trainers import last_checkpoint, remove_staging

    checkpoints = run_dir / "checkpoints"
    if overwrite:
        remove_run_dir(run_dir, root)
    elif not resume and (last_checkpoint(checkpoints) or (run_dir / "final").exists()):
        raise LmlabError("this run directory already holds a run", file=str(run_dir),
                         hint="pass --resume to continue it, --overwrite to start again, or change `name`")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_staging(checkpoints)


# ----------------------------------------------------------------------------- the stage skeleton

LAUNCH = "launch.json"  # how the run was launched (world size), to compare global batches on resume
# what a resumed run may change freely: where and how often it logs, evaluates and saves, and its guard
FREE_ON_RESUME = ("name", "output.", "eval.", "train.log_every", "train.eval_every", "train.eval_batches",
                  "train.save_every", "train.keep_last", "train.num_workers", "train.peak_tflops", "train.guard.",
                  "train.micro_batch_size", "train.grad_accum")  # the last two: the global batch is compared


def check_resumable(recipe: Recipe) -> None:
    """`--resume` continues the same run: a changed budget, data, model, LR or global batch is refused."""
    import yaml

    from lmlab.recipe import Recipe as RecipeModel

    saved_file = recipe.run_dir / "recipe.yaml"
    if not saved_file.is_file():
        return
    saved = RecipeModel.model_validate(yaml.safe_load(saved_file.read_text()))
    before = _dotted_keys(saved.model_dump(mode="json"))
    changed = [key for key, value in _dotted_keys(recipe.model_dump(mode="json")).items()
               if not key.startswith(FREE_ON_RESUME) and before.get(key) != value]
    launch = recipe.run_dir / LAUNCH
    saved_world = json.loads(launch.read_text()).get("world_size", 1) if launch.is_file() else 1
    batch = lambda r, world: r.train.micro_batch_size * r.train.grad_accum * world  # noqa: E731
    if batch(saved, saved_world) != batch(recipe, world_size()):
        changed.append("global batch (train.micro_batch_size x train.grad_accum x processes)")
    if changed:
        raise LmlabError(f"--resume would continue a different run: {', '.join(changed[:6])}"
                         + (f" and {len(changed) - 6} more" if len(changed) > 6 else "") + " changed",
                         file=str(saved_file), hint="undo the change, or pass --force to resume anyway")


def _dotted_keys(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_dotted_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def open_stage(recipe: Recipe, resume: bool, overwrite: bool, checkpoints: Path | None = None,
               checked=None) -> Path | None:
    """Rank 0 prepares the run directory and writes the resolved recipe; every rank gets the resume point.
    `checked` (stages.preflight.Checked) is what run_stage or a pipeline already checked."""
    from lmlab.paths import write_json_atomic, write_text_atomic
    from lmlab.stages.preflight import check_inputs

    checked = check_inputs(recipe, checked=checked)  # every input, before the run directory is touched
    start = check_resume(recipe, checkpoints, checked.force) if resume else None
    barrier()  # every rank has read the previous run's files before rank 0 rewrites them
    with main_first() as main:
        if main:
            prepare_run_dir(recipe.run_dir, resume, overwrite, Path(recipe.output.dir))
            write_text_atomic(recipe.run_dir / "recipe.yaml", dump_recipe(recipe))
            write_json_atomic(recipe.run_dir / LAUNCH, {"world_size": world_size()})
    if not resume:
        return None
    console().print(f"resuming from {start}" if start else "no complete checkpoint yet: starting from step 0")
    return start


def check_resume(recipe: Recipe, checkpoints: Path | None = None, force: bool = False) -> Path | None:
    """The checkpoint `--resume` continues from, checked: the same run (unless --force), readable files."""
    from lmlab.trainers import last_checkpoint

    if not force:
        check_resumable(recipe)
    start = last_checkpoint(checkpoints or recipe.run_dir / "checkpoints")
    if start is not None:
        check_checkpoint_files(start)
    return start


def check_checkpoint_files(checkpoint: Path) -> None:
    """A checkpoint to resume from: its trainer state parses and its weights' headers read."""
    from lmlab.models.build import check_weights

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmlabError(f"the checkpoint's trainer_state.json is damaged ({exc})",
                         file=str(checkpoint / "trainer_state.json"), field="--resume",
                         hint="delete this checkpoint to resume from the one before it") from None
    if any(checkpoint.glob("*.safetensors")):
        try:
            check_weights(checkpoint, "--resume")
            check_training_state(checkpoint)
        except LmlabError as exc:
            raise LmlabError(exc.message, file=exc.file, field="--resume",
                             hint="delete this checkpoint to resume from the one before it") from None


def check_training_state(checkpoint: Path) -> None:
    """The optimizer, scheduler and RNG files a resume loads are whole archives (torch saves zip files; a
    truncated one loses its central directory), checked without unpickling anything."""
    import zipfile

    for file in sorted(checkpoint.glob("*.pt")) + sorted(checkpoint.glob("*.pth")):
        try:
            with zipfile.ZipFile(file) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise LmlabError(f"damaged training state ({exc})", file=str(file)) from None


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
        labels = batch.pop("labels")[:, 1:]
        with torch.no_grad():
            logits = model(**batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = labels != -100
        total, n = trainer.accelerator.gather_for_metrics(((nll * mask).sum(1), mask.sum(1)))
        sums += total.tolist()
        counts += n.tolist()
    model.train(was_training)
    return Estimate(sums, counts, binary=False)


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
        ddp_find_unused_parameters=recipe.model.arch in ("qwen3_moe", "mixtral"),  # routed experts may sit idle
        **sharding_arguments(t.distributed, layer_class, gpu=cuda()),
        # fused AdamW, torch.compile and Liger kernels where they help (lmlab.stages.speed)
        **speed_arguments(recipe),
        # streamed rows: each rank reads its own shards (lmlab.data.pretrain_data.streamed_rows), none is sent
        **({"accelerator_config": {"dispatch_batches": False}} if recipe.data.streaming else {}),
    )
    return (args_class or TrainingArguments)(**{**kwargs, **extra})


def device_peak_flops() -> float | None:
    """Peak FLOP/s for MFU: the catalogue's dense bf16 figure on a known GPU; on CPU, the best dense
    fp32 matmul rate measured here (a CPU has no datasheet figure the model could reach)."""
    import torch

    if not torch.cuda.is_available():
        return measured_cpu_matmul_flops() * world_size()
    try:
        from lmlab.plan.hardware import lookup_gpu

        gpu = lookup_gpu(torch.cuda.get_device_name(0))
    except LmlabError:  # an unknown GPU: MFU is left out rather than guessed
        return None
    return gpu.bf16_tflops * 1e12 * world_size()


def measured_cpu_matmul_flops(size: int = 1536, repeats: int = 7) -> float:
    """Best of a few fp32 square matmuls: the attainable dense rate of this CPU with torch's threads."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def task_eval_callbacks(recipe: Recipe, metrics, tokenizer) -> list:
    """The training-time task/ORM callback when the recipe asks for one (tasks load before any compute)."""
    if not recipe.eval.tasks:
        return []
    from lmlab.callbacks import TaskEvalCallback
    from lmlab.evaluate.orm import load_scorer
    from lmlab.evaluate.tasks import load_task

    tasks = [load_task(spec, recipe.eval.n) for spec in recipe.eval.tasks]
    scorer = load_scorer(recipe.eval.orm) if recipe.eval.orm else None
    return [TaskEvalCallback(metrics, tokenizer, tasks, recipe.eval.every, recipe.eval.samples, scorer)]


def stage_callbacks(trainer, recipe: Recipe, tokenizer, tokens_per_step: int = 0, flops_per_token: float | None = None,
                    peak_flops: float | None = None, **metric_fields: Any):
    """Attach the one callback set (metrics, progress, task/ORM evaluation, divergence guard) to a trainer."""
    from lmlab.callbacks import DivergenceGuard, MetricsCallback, RichProgressCallback, attach_callbacks

    metrics = MetricsCallback(recipe.run_dir, tokens_per_step, flops_per_token, peak_flops=peak_flops,
                              stage=recipe.stage, tensorboard="tensorboard" in recipe.output.report_to,
                              fields=metric_fields)
    callbacks = [metrics, RichProgressCallback(recipe.name), *task_eval_callbacks(recipe, metrics, tokenizer)]
    if recipe.train.guard.enabled and hasattr(trainer, "guard"):
        # RL and preference losses are not cross-entropies: near zero or negative, so only their gradients spike
        trainer.guard = DivergenceGuard(recipe.train.guard, metrics,
                                        loss_spikes=recipe.stage in ("pretrain", "cpt", "sft", "distill"))
        callbacks.append(trainer.guard)
    attach_callbacks(trainer, callbacks)
    return metrics
