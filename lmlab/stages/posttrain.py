"""What the post-training stages share (SFT, reward models, DPO / KTO / ORPO, RL, chat distillation).

The tokenizer with its training chat template, chat records checked and split,
the policy loaded (full, LoRA, or QLoRA in NF4), the LoRA config with the
rules of docs/rules.md §4 on alpha/r and trainable parameters per sample, and the LR that
post-training derives from the input model's SFT LR. A stage imports these from
here, never from another stage.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.recipe import Recipe

ALPHA_OVER_R_LIMIT = 4  # docs/rules.md §4: r=8, alpha=128 damages the model
TRAINABLE_PER_SAMPLE_LIMIT = 10_000  # docs/rules.md §4: watch trainable params per sample


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


def sft_records(recipe: Recipe):
    """Every chat record of the recipe's sources as a disk-backed table (messages, doc_id), built once."""
    from lmlab.data.chat import chat_records
    from lmlab.data.records import cached_records, records_fingerprint
    from lmlab.data.store import source_fingerprint

    def rows():
        for spec in recipe.data.train:
            for where, line, messages in chat_records(spec, recipe.sft.layout, recipe.seed):
                row: dict[str, Any] = {"messages": messages, "doc_id": f"{where}:{line}"}
                if recipe.sft.enable_thinking is not None:
                    row["chat_template_kwargs"] = {"enable_thinking": recipe.sft.enable_thinking}
                yield row

    identity = records_fingerprint("sft", [source_fingerprint(s, recipe.seed) for s in recipe.data.train],
                                   recipe.sft.layout, recipe.sft.enable_thinking)
    return cached_records(rows, identity), identity


def load_sft_data(recipe: Recipe, tokenizer) -> SFTData:
    """Chat records, checked, split, and measured against the sequence length (all cached on disk)."""
    import numpy as np

    from lmlab.data.records import cached_map, chat_fingerprint, records_fingerprint
    from lmlab.data.split import doc_hash, held_out_indices

    records, identity = sft_records(recipe)
    if records is None:
        raise LmlabError("the SFT data has no records", field="data.train")

    def measure(batch):
        kwargs = batch.get("chat_template_kwargs") or [{}] * len(batch["messages"])
        return {"length": [len(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True, **(k or {}))
                                ["input_ids"]) for m, k in zip(batch["messages"], kwargs)],
                "hash": [doc_hash(i) for i in batch["doc_id"]]}

    measured = cached_map(records, measure, records_fingerprint(identity, chat_fingerprint(tokenizer)))
    lengths, hashes = np.asarray(measured["length"]), np.asarray(measured["hash"])
    limit = recipe.data.seq_len
    overlong = int((lengths > limit).sum())
    keep = np.arange(len(lengths))
    dropped = 0
    if recipe.sft.overlong == "drop":
        keep = keep[lengths <= limit]
        dropped = overlong
        if not len(keep):
            raise LmlabError(f"every record is longer than data.seq_len={limit}", field="data.seq_len")
    held = keep[held_out_indices(hashes[keep], recipe.sft.validation_fraction)]
    train = np.setdiff1d(keep, held)
    table = records.remove_columns("doc_id")
    return SFTData(table.select(train).shuffle(seed=recipe.seed), table.select(held) if len(held) else None,
                   len(train), overlong, dropped)


def lora_config(recipe: Recipe, examples: int, model) -> Any:
    """A peft LoraConfig, with the docs/rules.md §4 warnings on alpha/r and trainable parameters per sample."""
    from peft import LoraConfig

    lora = recipe.lora
    if lora.alpha / lora.r > ALPHA_OVER_R_LIMIT:
        warnings.warn(f"lora.alpha/lora.r = {lora.alpha / lora.r:g} > {ALPHA_OVER_R_LIMIT}: large scaling can damage "
                      "the base model (docs/rules.md §4: r=8, alpha=128)", stacklevel=2)
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


def load_policy(recipe: Recipe, tokenizer):
    """The base model; QLoRA loads it in NF4 with double quantisation (CUDA and bitsandbytes only)."""
    import torch

    from lmlab.models.build import attention_kernel, check_vocab, load_model

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
                                                     trust_remote_code=recipe.model.trust_remote_code,
                                                     attn_implementation=attention_kernel(
                                                         recipe.model.attn_implementation))
    else:
        model = load_model(recipe.model.from_pretrained, trust_remote_code=recipe.model.trust_remote_code,
                           attn_implementation=attention_kernel(recipe.model.attn_implementation))
    check_vocab(model, tokenizer, recipe.model.from_pretrained)
    return model


def post_training_lr(recipe: Recipe, ratio: float) -> float:
    """optim.lr when the recipe sets it; else the input model's training LR x `ratio` (docs/rules.md §5:
    preference optimisation and RL train 5-20x below the SFT LR)."""
    if "lr" in recipe.optim.model_fields_set:
        return recipe.optim.lr
    from lmlab.artifacts import read_manifest

    previous = read_manifest(recipe.model.from_pretrained or "").get("recipe", {}).get("optim", {}).get("lr")
    return (previous or recipe.optim.lr) * ratio


def check_preference_inputs(recipe: Recipe, pairs: list, prompts: list) -> None:
    """DPO / KTO / ORPO data: pairs or prompts to sample pairs from, never both; rounds need prompts."""
    if pairs and prompts:
        raise LmlabError("the preference data mixes pairs and prompt-only records", field="data.train",
                         hint="give pairs (prompt/chosen/rejected) or prompts to sample pairs from, not both")
    rounds = recipe.preference.rounds
    if rounds > 1 and not prompts:
        raise LmlabError(f"{rounds} rounds need prompts to sample fresh on-policy pairs from; fixed pairs "
                         "would be trained on again", field="preference.rounds")


def check_rl_inputs(recipe: Recipe, pairs: list, prompts: list) -> None:
    """RL prompts (never pairs) with what the rewards read; each step holds whole groups; rewards exist."""
    from lmlab.evaluate.orm import VERIFIERS

    from lmlab.distributed import world_size

    r, t = recipe.rl, recipe.train
    completions = t.micro_batch_size * t.grad_accum * world_size()  # a group may span ranks (TRL gathers it)
    if completions % r.num_generations:
        raise LmlabError(f"train.micro_batch_size x train.grad_accum x processes ({completions}) must be a "
                         f"multiple of rl.num_generations ({r.num_generations}): each step holds whole groups",
                         field="train.micro_batch_size")
    if pairs:
        raise LmlabError("RL samples its own responses: give prompts, not preference pairs", field="data.train")
    missing = sum(isinstance(a, bool) or not isinstance(a, int) for a in (prompts["answer"] if prompts else []))
    if "math_exact" in r.rewards and missing:
        raise LmlabError(f"{missing} prompts have no integer 'answer', which the math_exact reward needs",
                         field="data.train")
    for reward in r.rewards:
        if reward not in VERIFIERS and not Path(reward).is_dir():
            raise LmlabError(f"unknown scorer '{reward}'", field="rl.rewards",
                             hint=f"a verifier ({', '.join(VERIFIERS)}) or a reward-model directory")
