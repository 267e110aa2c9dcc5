"""The speed options, resolved once from the recipe for every stage: optimizer kernel, attention
kernel, torch.compile and Liger kernels.

Each is a recipe switch whose default `auto` turns it on where it helps and is safe:

- `optim.optimizer: auto` is fused AdamW on CUDA (one kernel for all parameters), plain AdamW on CPU;
- `model.attn_implementation: auto` is FlashAttention-2 on CUDA when `flash_attn` is installed: packed
  rows carry `position_ids` and no mask, so transformers takes its variable-length path (no dense
  block mask). Otherwise SDPA, which picks the flash kernel itself where the mask allows;
- `train.compile: auto` compiles the model on CUDA for packed rows, whose shapes never change (chat
  batches vary in length and would recompile);
- `train.liger: auto` uses Liger's fused kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)
  on CUDA when `liger-kernel` is installed.

A switch set explicitly to something this machine cannot do is an error before any compute.
"""

from __future__ import annotations

from typing import Any

from lmlab.errors import LmlabError
from lmlab.models.build import attention_kernel, cuda, installed


def optimizer_name(requested: str) -> str:
    """`auto`: fused AdamW on CUDA, AdamW elsewhere; any other HF Trainer `optim` name as given.

    `muon` is built by the trainer itself (lmlab.trainers, lmlab.optimizers); the Trainer's own name
    stays AdamW's, which its argument checks accept."""
    if requested not in ("auto", "muon"):
        return requested
    return "adamw_torch_fused" if cuda() else "adamw_torch"


def compile_model(requested: bool | str, fixed_shapes: bool) -> bool:
    """`auto`: compile on CUDA when every batch has the same shape (packed rows)."""
    if requested == "auto":
        return cuda() and fixed_shapes
    return bool(requested)


def liger_kernels(requested: bool | str) -> bool:
    """`auto`: Liger's kernels on CUDA when liger-kernel is installed; `true` without them is an error."""
    if requested == "auto":
        return cuda() and installed("liger_kernel")
    if requested and not cuda():
        raise LmlabError("Liger kernels need a CUDA GPU", field="train.liger", hint="use auto or false on CPU")
    if requested and not installed("liger_kernel"):
        raise LmlabError("train.liger needs the liger-kernel package", field="train.liger",
                         hint="pip install liger-kernel, or set train.liger: auto")
    return bool(requested)


def check_speed_options(recipe) -> None:
    """Every explicit switch is possible here (preflight calls this before anything runs)."""
    from lmlab.optimizers import check_muon

    attention_kernel(recipe.model.attn_implementation)
    liger_kernels(recipe.train.liger)
    check_muon(recipe.optim.optimizer, recipe.train.distributed)


def packed_rows(recipe) -> bool:
    """Whether the stage trains on packed rows of seq_len tokens: every batch has the same shape."""
    return recipe.stage in ("pretrain", "cpt") or (recipe.stage == "distill" and recipe.distill.data_format == "text")


def speed_arguments(recipe) -> dict[str, Any]:
    """The TrainingArguments fields the speed switches set."""
    return dict(optim=optimizer_name(recipe.optim.optimizer),
                torch_compile=compile_model(recipe.train.compile, packed_rows(recipe)),
                use_liger_kernel=liger_kernels(recipe.train.liger))
