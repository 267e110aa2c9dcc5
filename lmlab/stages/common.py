"""What every training stage wires the same way: the one callback set (metrics, progress, task / ORM
evaluation, the divergence guard) and the device's peak FLOP/s for MFU. The run directory and resume live in
stages.rundir, the training loop and final save in stages.loop, budgets and HF arguments in
stages.arguments."""

from __future__ import annotations

import functools
from typing import Any

from lmlab.distributed import world_size
from lmlab.errors import LmlabError
from lmlab.recipe import Recipe


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
    """Best of a few fp32 square matmuls: the attainable dense rate of this CPU with torch's threads
    (measured once per process and thread count: a pipeline's stages share the figure)."""
    import torch

    return _cpu_matmul_flops(size, repeats, torch.get_num_threads())


@functools.lru_cache(maxsize=8)
def _cpu_matmul_flops(size: int, repeats: int, threads: int) -> float:
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
    """Attach the one callback set (metrics, progress, task/ORM evaluation, divergence guard) to a trainer,
    and hand it the optimizer it builds itself (`optim.optimizer: muon`); every stage's trainer passes here."""
    from lmlab.callbacks import (DivergenceGuard, MetricsCallback, RankStatusCallback, RichProgressCallback,
                                 attach_callbacks)

    metrics = MetricsCallback(recipe.run_dir, tokens_per_step, flops_per_token, peak_flops=peak_flops,
                              stage=recipe.stage, tensorboard="tensorboard" in recipe.output.report_to,
                              fields=metric_fields)
    callbacks = [metrics, RichProgressCallback(recipe.name), *task_eval_callbacks(recipe, metrics, tokenizer)]
    if world_size() > 1:
        callbacks.append(RankStatusCallback())
    if recipe.train.guard.enabled and hasattr(trainer, "guard"):
        # RL and preference losses are not cross-entropies: near zero or negative, so only their gradients spike
        trainer.guard = DivergenceGuard(recipe.train.guard, metrics,
                                        loss_spikes=recipe.stage in ("pretrain", "cpt", "sft", "distill"))
        callbacks.append(trainer.guard)
    attach_callbacks(trainer, callbacks)
    if recipe.optim.optimizer == "muon":
        trainer.muon = recipe.optim
    return metrics
