"""`--dry-run` for a stage command: every input checked, then what the run would be, nothing trained or written.

It prints the model's parameters, the budget (steps, tokens, epochs), the memory per device from the
planner's model and the time at an assumed MFU, so a user sees what `lmlab sft recipe.yaml` will do
before spending the compute. Sizes that are known only once data is tokenised (the tokens of a
corpus whose token store is not built yet) are said to be unknown, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmlab.distributed import world_size
from lmlab.plan.memory import HF_OPTIMIZER
from lmlab.recipe import Recipe

GB = 1024 ** 3


def model_shape(recipe: Recipe):
    """The model's shape from its checkpoint's config.json (an adapter: its base's), or from the model block."""
    from lmlab.models.build import adapter_base, is_adapter
    from lmlab.plan.params import shape_from_config, shape_from_model_block

    if recipe.model.from_pretrained:
        path = Path(recipe.model.from_pretrained)
        if is_adapter(path):
            path = adapter_base(path)
        return shape_from_config(json.loads((path / "config.json").read_text()), name=path.name, where=str(path))
    tokenizer = known_tokenizer(recipe)
    return shape_from_model_block(recipe.model, len(tokenizer) if tokenizer else recipe.tokenizer.vocab_size)


def known_tokenizer(recipe: Recipe):
    """The tokenizer the run will use when it exists already (none while it is still to be trained)."""
    from lmlab.data.tokenizer import load_tokenizer, tokenizer_dir

    path, _ = tokenizer_dir(recipe, recipe.run_dir)
    return load_tokenizer(path) if (path / "tokenizer.json").is_file() else None


def stored_train_tokens(recipe: Recipe) -> int | None:
    """Training tokens of the recipe's token stores when every one is built, else None."""
    from lmlab.data.store import is_complete, open_store, store_key, store_root

    tokenizer = known_tokenizer(recipe)
    if tokenizer is None or recipe.data.streaming:
        return None
    total = 0
    fraction = recipe.data.validation_fraction if recipe.data.validation is None else 0.0
    for spec in recipe.data.train:
        path = store_root() / store_key(spec, tokenizer, fraction, recipe.seed)[0]
        if not is_complete(path):
            return None
        total += open_store(path).train.n_tokens
    return total


def examples(recipe: Recipe) -> int:
    """Records the stage trains on: chats for SFT, pairs or prompts for the preference and RL stages."""
    if recipe.stage == "sft" or (recipe.stage == "distill" and recipe.distill.data_format == "chat"):
        from lmlab.stages.posttrain import sft_records

        records, _ = sft_records(recipe)
        return round(len(records) * (1 - recipe.sft.validation_fraction))
    from lmlab.data.pairs import preference_inputs

    pairs, prompts = preference_inputs(recipe.data.train, recipe.seed)
    return len(pairs) or len(prompts)


def budget_lines(recipe: Recipe, params: int) -> tuple[list[str], int | None, int | None]:
    """What the budget comes to: printed lines, optimizer steps and tokens (None where not known yet)."""
    from lmlab.stages.arguments import steps_over_examples, training_budget
    from lmlab.stages.speed import packed_rows

    t, seq_len = recipe.train, recipe.data.seq_len
    batch = t.micro_batch_size * t.grad_accum * world_size()
    if packed_rows(recipe):
        unique = stored_train_tokens(recipe)
        if not (t.max_steps or t.tokens or t.tokens_per_param) and unique is None:
            return [f"budget: one pass over the data; its tokens are counted when the token store is built "
                    f"(`lmlab data prepare`), at {batch * seq_len:,} tokens per step"], None, None
        b = training_budget(t, seq_len, params, unique)
        epochs = f", {b.epochs:.2f} epochs of {unique:,} unique tokens" if b.epochs and unique else ""
        return [f"budget: {b.max_steps:,} steps x {b.tokens_per_step:,} tokens = {b.tokens:,} tokens "
                f"({b.tokens / params:.1f} tokens/param){epochs}"], b.max_steps, b.tokens
    n = examples(recipe)
    per_example = recipe.rl.num_generations if recipe.stage == "rl" else 1
    epochs = t.epochs
    if recipe.stage == "sft" and not (t.max_steps or t.tokens or t.tokens_per_param):
        from lmlab.plan.rules import default_sft_epochs

        epochs = epochs or default_sft_epochs(n)
    steps = steps_over_examples(t, n, per_example=per_example, epochs=epochs)
    tokens = steps * batch * seq_len
    what = {"rl": "prompts", "dpo": "pairs", "kto": "pairs", "orpo": "pairs", "rm": "pairs"}.get(recipe.stage,
                                                                                             "conversations")
    return [f"data: {n:,} {what}" + (f", {epochs:g} epochs" if epochs and not t.max_steps else ""),
            f"budget: {steps:,} steps x {batch} sequences of at most {seq_len} tokens "
            f"(at most {tokens:,} tokens)"], steps, tokens


def stage_loss_tiling(recipe: Recipe, vocab_size: int) -> str:
    """How the stage's loss step holds the logits: pretraining, CPT and distillation per
    lmlab.stages.packed.loss_tiling, TRL's trainers (SFT, preference, RL) always in their fused head."""
    from lmlab.stages.packed import loss_tiling

    return loss_tiling(recipe, vocab_size) if recipe.stage in ("pretrain", "cpt", "distill") else "fused"


# HF Trainer `optim` names -> the planner's optimizer memory: the inverse of the planner's table, and HF's
# other 8-bit AdamW names (anything else is counted as AdamW)
PLANNED_OPTIMIZER = {**{hf: ours for ours, hf in HF_OPTIMIZER.items()}, "adamw_8bit": "adamw_8bit",
                     "paged_adamw_8bit": "adamw_8bit"}


def memory_line(recipe: Recipe, shape) -> str:
    """Memory per device from the planner's model of weights, gradients, optimizer states and activations."""
    from lmlab.models.build import cuda, installed
    from lmlab.plan.memory import TrainSetup, training_memory
    from lmlab.stages.arguments import use_bf16

    lora = recipe.lora
    method = ("qlora" if lora.quantize != "none" else "lora") if lora.enabled else "full"
    mode = recipe.train.distributed  # zero1 / zero2 / zero3 (FSDP2 or DeepSpeed), with or without offload; else DDP
    sharding = next((stage for stage in ("zero3", "zero2", "zero1") if stage in mode), "ddp")
    setup = TrainSetup(method=method, sharding=sharding, offload="offload" in mode,
                       offload_params=mode.endswith("offload"), num_gpus=world_size(),
                       micro_batch=recipe.train.micro_batch_size, seq_len=recipe.data.seq_len,
                       gradient_checkpointing=recipe.train.gradient_checkpointing,
                       precision_bytes=2 if use_bf16(recipe.train.precision) else 4, lora_rank=lora.r,
                       optimizer=PLANNED_OPTIMIZER.get(recipe.optim.optimizer, "adamw"),
                       quant_bits=8 if lora.quantize == "int8" else 4,
                       attention="sdpa", loss_tiling=stage_loss_tiling(recipe, shape.vocab_size), triton=cuda() and installed("triton"))
    m = training_memory(shape, setup)
    return (f"memory per device: {size(m.total)} (weights {size(m.weights)}, gradients {size(m.gradients)}, "
            f"optimizer {size(m.optimizer)}, activations and loss {size(m.activations)}, logits "
            f"{'whole' if setup.loss_tiling == 'off' else 'in tiles'}; lmlab plan's model)")


def size(num_bytes: float) -> str:
    return f"{num_bytes / GB:.2f} GB" if num_bytes >= GB else f"{num_bytes / 1024 ** 2:.1f} MB"


def time_line(shape, active: int, tokens: int | None, seq_len: int) -> str:
    from lmlab.plan.compute import DEFAULT_MFU, flops_per_token, human_duration
    from lmlab.stages.common import device_peak_flops

    if tokens is None:
        return "time: known once the budget is"
    peak = device_peak_flops()
    if not peak:
        return "time: unknown (this GPU's peak is not in lmlab's catalogue; set train.peak_tflops)"
    seconds = tokens * flops_per_token(active, shape, seq_len) / (peak * DEFAULT_MFU)
    return (f"time: about {human_duration(seconds)} of training at an assumed {DEFAULT_MFU:.0%} MFU of "
            f"{peak / 1e12:.2f} TFLOP/s (this device{', all processes' if world_size() > 1 else ''})")


def describe(recipe: Recipe) -> list[str]:
    """The dry run's lines, after every input check the real run makes first."""
    from lmlab.plan.params import count_params
    from lmlab.stages.preflight import check_inputs

    check_inputs(recipe)
    shape = model_shape(recipe)
    count = count_params(shape)
    source = recipe.model.from_pretrained or f"a fresh {recipe.model.arch}"
    lines = [f"{recipe.stage} {recipe.name} -> {recipe.run_dir} (dry run: nothing is trained or written)",
             f"model: {source}, {count.total:,} parameters"
             + (f" ({count.active:,} active)" if count.active != count.total else "")
             + (f", LoRA r={recipe.lora.r}" if recipe.lora.enabled else "")]
    budget, _, tokens = budget_lines(recipe, count.total)
    lines += budget
    lines.append(memory_line(recipe, shape))
    lines.append(time_line(shape, count.active, tokens, recipe.data.seq_len))
    return lines
