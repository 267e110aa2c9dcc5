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
from lmlab.errors import LmlabError
from lmlab.recipe import Recipe

ALPHA_OVER_R_LIMIT = 4  # RECIPES.md 4: r=8, alpha=128 damages the model
TRAINABLE_PER_SAMPLE_LIMIT = 10_000  # RECIPES.md 4: watch trainable params per training sample


@dataclass
class SFTData:
    train: Any
    validation: Any
    examples: int
    overlong: int
    dropped: int


def prepare_tokenizer(recipe: Recipe):
    """The checkpoint's tokenizer with the training chat template the recipe asks for."""
    from lmlab.data.tokenizer import chat_template, load_tokenizer

    tokenizer = load_tokenizer(recipe.tokenizer.path or recipe.model.from_pretrained)
    if recipe.sft.chat_template != "tokenizer":
        tokenizer.chat_template = chat_template(recipe.sft.chat_template)
    if not tokenizer.chat_template:
        raise LmlabError("the tokenizer has no chat template", field="sft.chat_template",
                         hint="set sft.chat_template: chatml")
    if recipe.sft.assistant_only_loss and "generation" not in tokenizer.chat_template:
        raise LmlabError("assistant_only_loss needs {% generation %} markers, which this chat template lacks",
                         field="sft.chat_template", hint="use sft.chat_template: chatml (lmlab's training template)")
    return tokenizer


def load_sft_data(recipe: Recipe, tokenizer) -> SFTData:
    """Chat records, checked, split, and measured against the sequence length."""
    from datasets import Dataset

    from lmlab.data.chat import chat_records
    from lmlab.data.sources import doc_hash

    rows = []
    for spec in recipe.data.train:
        for where, line, messages in chat_records(spec, recipe.sft.layout, recipe.seed):
            row: dict[str, Any] = {"messages": messages, "doc_id": f"{where}:{line}"}
            if recipe.sft.enable_thinking is not None:
                row["chat_template_kwargs"] = {"enable_thinking": recipe.sft.enable_thinking}
            rows.append(row)
    if not rows:
        raise LmlabError("the SFT data has no records", field="data.train")
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True,
                                                 **r.get("chat_template_kwargs", {}))["input_ids"]) for r in rows]
    limit = recipe.data.seq_len
    overlong = sum(n > limit for n in lengths)
    dropped = 0
    if recipe.sft.overlong == "drop":
        rows = [r for r, n in zip(rows, lengths) if n <= limit]
        dropped = overlong
        if not rows:
            raise LmlabError(f"every record is longer than data.seq_len={limit}", field="data.seq_len")
    fraction = recipe.sft.validation_fraction
    train = [r for r in rows if doc_hash(r["doc_id"]) >= fraction]
    validation = [r for r in rows if doc_hash(r["doc_id"]) < fraction]
    if fraction and not validation:
        validation, train = train[:1], train[1:]
    strip = lambda rs: Dataset.from_list([{k: v for k, v in r.items() if k != "doc_id"} for r in rs])  # noqa: E731
    return SFTData(strip(train).shuffle(seed=recipe.seed), strip(validation) if validation else None,
                   len(train), overlong, dropped)


def lora_config(recipe: Recipe, examples: int, model) -> Any:
    """A peft LoraConfig, with the RECIPES.md warnings on alpha/r and trainable parameters per sample."""
    from peft import LoraConfig

    lora = recipe.lora
    if lora.alpha / lora.r > ALPHA_OVER_R_LIMIT:
        warnings.warn(f"lora.alpha/lora.r = {lora.alpha / lora.r:g} > {ALPHA_OVER_R_LIMIT}: large scaling can damage "
                      "the base model (RECIPES.md: r=8, alpha=128)", stacklevel=2)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    from lmlab.plan.memory import lora_params
    from lmlab.plan.params import shape_from_config

    targets = lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules)
    trainable = lora_params(shape_from_config(model.config.to_dict()), lora.r, targets)
    if trainable / max(1, examples) > TRAINABLE_PER_SAMPLE_LIMIT:
        warnings.warn(f"{trainable:,} trainable parameters for {examples:,} samples "
                      f"({trainable / examples:,.0f} per sample): expect overfitting; lower lora.r", stacklevel=2)
    return config


def load_sft_model(recipe: Recipe, tokenizer):
    """The base model; QLoRA loads it in NF4 with double quantisation (CUDA and bitsandbytes only)."""
    import torch

    from lmlab.models.build import check_vocab, load_model

    if recipe.lora.enabled and recipe.lora.quantize == "nf4":
        if not torch.cuda.is_available():
            raise LmlabError("QLoRA (lora.quantize: nf4) needs a CUDA GPU and bitsandbytes", field="lora.quantize",
                             hint="use plain LoRA (lora.quantize: none) on CPU")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise LmlabError("QLoRA needs bitsandbytes: pip install 'lmlab[gpu]'", field="lora.quantize")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(recipe.model.from_pretrained, quantization_config=quant,
                                                     use_safetensors=True, dtype=torch.bfloat16,
                                                     trust_remote_code=recipe.model.trust_remote_code)
    else:
        model = load_model(recipe.model.from_pretrained, trust_remote_code=recipe.model.trust_remote_code,
                           attn_implementation=recipe.model.attn_implementation)
    check_vocab(model, tokenizer, recipe.model.from_pretrained)
    return model


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
    model = load_sft_model(recipe, tokenizer)
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
        from lmlab.evaluate.generation import math_accuracy

        for split in ("id", "ood"):
            final_metrics.update(math_accuracy(trainer.model, tokenizer, split, recipe.sft.eval_math))
        out.print(f"greedy math accuracy: in-domain {final_metrics['math_id_greedy_accuracy']:.1%}, "
                      f"out-of-domain {final_metrics['math_ood_greedy_accuracy']:.1%} "
                      f"({recipe.sft.eval_math} problems each)")
    manifest = {"stage": "sft", "name": recipe.name, "recipe": recipe.model_dump(mode="json"),
                "input_artifact": recipe.model.from_pretrained, "examples": data.examples,
                "overlong": data.overlong, "dropped": data.dropped, "epochs": epochs,
                "steps": trainer.state.global_step, "adapter": recipe.lora.enabled, "metrics": final_metrics}
    final = save_final(trainer, tokenizer, run_dir / "final", manifest)
    out.print(f"[bold green]{'LoRA adapter' if recipe.lora.enabled else 'HF checkpoint'}:[/] {final}"
                  + ("  (merge it with `lmlab export`)" if recipe.lora.enabled else ""))
    return final


def export_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into its base model: a full HF checkpoint with the tokenizer and chat template."""
    import json

    from peft import PeftModel

    from lmlab.artifacts import read_manifest, save_artifact
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.build import load_model

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise LmlabError("not a LoRA adapter: adapter_config.json is missing", file=str(adapter_dir))
    base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise LmlabError(f"the adapter's base model '{base}' is not a local directory", file=str(config_path),
                         field="base_model_name_or_path")
    model = PeftModel.from_pretrained(load_model(base), adapter_dir).merge_and_unload()
    manifest = {**read_manifest(adapter_dir), "stage": "export", "adapter": False, "merged_from": str(adapter_dir),
                "base_model": base}
    return save_artifact(model, load_tokenizer(adapter_dir), out_dir, manifest)
