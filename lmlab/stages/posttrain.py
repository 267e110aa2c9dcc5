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

from lmlab.console import console
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
    assistant_mask: str | None = None  # how the loss mask was made (lmlab.data.masks), None: every token


def prepare_tokenizer(recipe: Recipe):
    """The checkpoint's tokenizer with the chat template the recipe asks for, checked before compute.

    `auto` keeps the checkpoint's own template (a Qwen3 keeps its tools and thinking, and that is
    what the artifact is saved with); only a tokenizer without one that has lmlab's ChatML tokens
    gets lmlab's ChatML. `chatml` / `chatml_think` replace it on request, if their markers are tokens
    of this vocabulary. SFT's assistant-only loss then needs a template with generation markers:
    the template's own, or TRL's training version of a known family's template.
    """
    from lmlab.data.tokenizer import CHAT_TOKENS, chat_template, load_tokenizer

    tokenizer = load_tokenizer(recipe.tokenizer.path or recipe.model.from_pretrained)
    choice = recipe.sft.chat_template
    lmlab_vocabulary = all(t in tokenizer.get_vocab() for t in CHAT_TOKENS)
    if choice in ("chatml", "chatml_think"):
        if not lmlab_vocabulary:
            missing = [t for t in CHAT_TOKENS if t not in tokenizer.get_vocab()]
            raise LmlabError(f"sft.chat_template: {choice} writes {', '.join(missing)}, which this vocabulary lacks "
                             "(it would become several byte tokens, and no turn would end on a stop token)",
                             field="sft.chat_template", hint="use sft.chat_template: auto (the checkpoint's own)")
        tokenizer.chat_template = chat_template(choice)
    elif not tokenizer.chat_template:
        if choice == "auto" and lmlab_vocabulary:
            tokenizer.chat_template = chat_template("chatml")
        else:
            raise LmlabError("the tokenizer has no chat template", field="sft.chat_template",
                             hint="save the checkpoint with its template, or set sft.chat_template: chatml on a "
                                  "vocabulary with <|im_start|> and <|im_end|>")
    if recipe.sft.assistant_only_loss and (recipe.stage == "sft" or recipe.distill.data_format == "chat"):
        from lmlab.data.masks import check_template

        check_template(tokenizer)  # a template whose turns cannot be located fails now, not at the trainer
    return tokenizer


def sft_records(recipe: Recipe):
    """Every chat record of the recipe's sources as a disk-backed table (messages, doc_id), built once."""
    from lmlab.data.chat import chat_features, chat_records
    from lmlab.data.records import cached_records, records_fingerprint
    from lmlab.data.store import source_fingerprint

    def rows():
        for spec in recipe.data.train:
            for where, line, messages in chat_records(spec, recipe.sft.layout, recipe.seed):
                row: dict[str, Any] = {"messages": messages, "doc_id": f"{where}:{line}"}
                if recipe.sft.enable_thinking is not None:
                    row["chat_template_kwargs"] = {"enable_thinking": recipe.sft.enable_thinking}
                yield row

    identity = records_fingerprint("sft-v2", [source_fingerprint(s, recipe.seed) for s in recipe.data.train],
                                   recipe.sft.layout, recipe.sft.enable_thinking,
                                   [(s.columns, s.roles) for s in recipe.data.train])
    features = chat_features(template_kwargs=recipe.sft.enable_thinking is not None)
    return cached_records(rows, identity, features), identity


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
    method = None
    if recipe.sft.assistant_only_loss:  # tokenised here with the loss mask, so any template trains
        table, method = masked_chats(records, tokenizer, identity)
    else:
        table = records.remove_columns("doc_id")
    overlong_train = int((lengths[train] > limit).sum())  # of the records trained on, as `examples` counts
    return SFTData(table.select(train).shuffle(seed=recipe.seed), table.select(held) if len(held) else None,
                   len(train), overlong_train, dropped, method)


def masked_chats(records, tokenizer, identity: str):
    """Chat records as input_ids and assistant_masks (the reply and its end-of-turn token), made the way
    lmlab.data.masks finds for this template; a record the template cannot locate turns in names its line."""
    from lmlab.data.masks import mask_method, masked_ids
    from lmlab.data.records import cached_map, chat_fingerprint, records_fingerprint

    method, template = mask_method(tokenizer)  # the template was tried out by prepare_tokenizer

    def tokenise(batch):
        kwargs = batch.get("chat_template_kwargs") or [None] * len(batch["messages"])
        rows = [masked_ids(tokenizer, messages, method, template, where, **(extra or {}))
                for messages, extra, where in zip(batch["messages"], kwargs, batch["doc_id"])]
        return {"input_ids": [r["input_ids"] for r in rows], "assistant_masks": [r["assistant_masks"] for r in rows]}

    fingerprint = records_fingerprint(identity, chat_fingerprint(tokenizer), "assistant-masks-v1", method)
    return cached_map(records, tokenise, fingerprint, remove_columns=records.column_names), method


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
    try:
        trainable = lora_params(shape_from_config(model.config.to_dict()), lora.r, targets)
    except LmlabError:  # an architecture the planner does not count: no estimate, no warning
        return config
    if trainable / max(1, examples) > TRAINABLE_PER_SAMPLE_LIMIT:
        warnings.warn(f"{trainable:,} trainable parameters for {examples:,} samples "
                      f"({trainable / examples:,.0f} per sample): expect overfitting; lower lora.r", stacklevel=2)
    return config


def load_policy(recipe: Recipe, tokenizer):
    """The base model; QLoRA loads it in NF4 with double quantisation, or in LLM.int8 (CUDA and bitsandbytes
    only)."""
    import torch

    from lmlab.models.build import attention_kernel, check_vocab, installed, load_model

    if recipe.lora.enabled and recipe.lora.quantize != "none":
        if not torch.cuda.is_available():
            raise LmlabError(f"QLoRA (lora.quantize: {recipe.lora.quantize}) needs a CUDA GPU and bitsandbytes",
                             field="lora.quantize",
                             hint="use plain LoRA (lora.quantize: none) on CPU")
        if not installed("bitsandbytes"):
            raise LmlabError("QLoRA needs bitsandbytes: pip install 'lmlab[gpu]'", field="lora.quantize")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_8bit=True) if recipe.lora.quantize == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
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
    anchor_reference(recipe, model, tokenizer)
    return model


def anchor_reference(recipe: Recipe, model, tokenizer) -> None:
    """Name the checkpoint that holds the policy's starting weights in `config._name_or_path`, the path TRL
    loads again as the reference model of DPO / KTO and of GRPO / RLOO with a KL term.

    A checkpoint directory already names itself. A LoRA adapter does not: its merged model still carries its
    base's path, so the KL reference became the model before the adapter's training (KL 1.45 at RL's first
    step). Its merged weights are written once to the run's `reference/` and named there. Training a new LoRA
    needs neither: TRL's reference is then the policy with the new adapter disabled.
    """
    from lmlab.artifacts import save_artifact
    from lmlab.distributed import main_first
    from lmlab.models.build import is_adapter

    start = Path(recipe.model.from_pretrained or "")
    if recipe.lora.enabled or recipe.stage not in ("dpo", "kto", "rl"):
        return
    if is_adapter(start):
        reference = recipe.run_dir / "reference"
        with main_first() as main:
            if main and not (reference / "config.json").is_file():
                save_artifact(model, tokenizer, reference, {"stage": "reference", "adapter": str(start.resolve())})
        start = reference
    model.config._name_or_path = str(start.resolve())


def fine_tuning_lr(recipe: Recipe, model, ratio: float = 1.0, from_previous: bool = True) -> float:
    """The stage's LR, printed with where it comes from.

    - optim.lr when the recipe sets it (with a warning when it is far outside the usual range for a
      pretrained model of this size and method);
    - after an lmlab stage: the previous stage's LR x `ratio` (`from_previous`; docs/rules.md §5:
      preference optimisation and RL train 5-20x below the SFT LR), or the recipe's default;
    - on someone else's checkpoint: the literature's fine-tuning LR for its size and method (full,
      LoRA), x `ratio` for preference optimisation, RL and reward models.
    """
    import math

    from lmlab.artifacts import read_manifest
    from lmlab.models.build import count_parameters
    from lmlab.plan.rules import FT, learning_rate_range

    method = ("qlora" if recipe.lora.quantize != "none" else "lora") if recipe.lora.enabled else "full"
    params = count_parameters(model)
    low, high = (bound * ratio for bound in learning_rate_range(params, method))
    manifest = read_manifest(recipe.model.from_pretrained or "")
    if "lr" in recipe.optim.model_fields_set:
        lr = recipe.optim.lr
        if not manifest and not low / 3 <= lr <= high * 3:
            warnings.warn(f"optim.lr {lr:.1e} is far from the usual {low:.0e}..{high:.0e} for {method} "
                          f"{recipe.stage} of a {params / 1e9:.2g}B-parameter pretrained model ({FT})", stacklevel=2)
        return lr
    if manifest:  # an lmlab chain: its own tiny-model LRs
        previous = manifest.get("recipe", {}).get("optim", {}).get("lr") if from_previous else None
        return (previous or recipe.optim.lr) * ratio
    lr = float(f"{math.sqrt(low * high):.1e}")
    console().print(f"optim.lr {lr:.1e}: the usual {method} {recipe.stage} LR for a {params / 1e9:.2g}B-parameter "
                    f"pretrained model ({low:.0e}..{high:.0e}; {FT}); set optim.lr to choose another")
    return lr


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
    learned = [reward for reward in r.rewards if reward not in VERIFIERS]
    if r.filter is not None and learned:
        raise LmlabError(f"rl.filter counts a sample as passed when every verifier scores 1, and '{learned[0]}' is "
                         "a reward model, whose scores have no pass mark", field="rl.filter",
                         hint="filter with verifier rewards only, or drop rl.filter")


@dataclass
class ChatReplay:
    """General text mixed into SFT's prepared rows: what was mixed, and its held-out rows for forgetting."""

    report: dict[str, float]
    validation: Any  # held-out general windows (input_ids, labels), or None


def _windows(rows, indices, lengths, eos_id: int, packed: bool) -> list[dict[str, list[int]]]:
    """Replay rows as SFT rows: every token is a loss token; packed rows split at each document's end
    so no document attends to another (the `seq_lengths` TRL's padding-free packing reads)."""
    ids = rows.columns(indices)["input_ids"].tolist()
    out = []
    for window, length in zip(ids, lengths):
        window = window[:length]
        row = {"input_ids": window, "labels": list(window)}
        if packed:
            ends = [i + 1 for i, t in enumerate(window) if t == eos_id]
            bounds = [0, *[e for e in ends if e < len(window)], len(window)]
            row["seq_lengths"] = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
        out.append(row)
    return out


def mix_chat_replay(recipe: Recipe, trainer, tokenizer) -> ChatReplay | None:
    """Mix general text into the SFT trainer's prepared rows as an exact share of the training tokens.

    SFT on a narrow domain forgets general ability (the quickstart's general bits per byte nearly doubled);
    CPT's cure is replay, and the same cure works here (docs/rules.md §2): `data.replay` names the general
    sources and `data.replay_ratio` the share. As in CPT, the share is of the tokens the loss is computed on:
    the rows TRL prepared (tokenised, truncated, packed) hold D assistant (loss) tokens, and
    round(ratio / (1 - ratio) * D) tokens of general windows join them, all of them loss tokens as in
    pretraining, the last window cut to the exact count, so replay is `ratio` of every trained token in every
    epoch. (Counted over all tokens instead, prompts would inflate the replay: in the quickstart's chats only
    a fifth of the tokens are the assistant's.)
    """
    from datasets import Dataset, concatenate_datasets

    from lmlab.data.pretrain_data import build_packed_data, repeat_indices, replay_block

    if not recipe.data.replay:
        return None
    if recipe.data.streaming:
        raise LmlabError("exact replay mixing needs map-style data", field="data.streaming",
                         hint="set data.streaming: false for SFT with replay")
    train = trainer.train_dataset
    domain_tokens = int(sum(len(ids) for ids in train["input_ids"]))
    domain_loss = int(sum(sum(label != -100 for label in labels) for labels in train["labels"]))
    ratio, seq_len = recipe.data.replay_ratio, recipe.data.seq_len
    replay_tokens = round(ratio / (1 - ratio) * domain_loss)
    data = build_packed_data(replay_block(recipe.data), tokenizer, recipe.seed, recipe.train.eval_batches
                             * recipe.train.micro_batch_size)
    if not len(data.train):
        raise LmlabError("the replay sources hold no full window of data.seq_len tokens", field="data.replay")
    full, rest = divmod(replay_tokens, seq_len)
    indices = repeat_indices(len(data.train), full + bool(rest), recipe.seed + 1)
    lengths = [seq_len] * full + ([rest] if rest else [])
    packed = "seq_lengths" in train.column_names
    rows = Dataset.from_list(_windows(data.train, indices, lengths, tokenizer.eos_token_id, packed))
    rows = rows.cast(train.select_columns(rows.column_names).features)
    trainer.train_dataset = concatenate_datasets([train.select_columns(rows.column_names), rows]).shuffle(
        seed=recipe.seed)
    validation = None
    if data.validation is not None and len(data.validation):
        held = range(len(data.validation))
        validation = Dataset.from_list(_windows(data.validation, held, [seq_len] * len(held),
                                                tokenizer.eos_token_id, False))
    report = {"domain_tokens": domain_tokens, "domain_loss_tokens": domain_loss, "replay_tokens": replay_tokens,
              "replay_share": replay_tokens / (replay_tokens + domain_loss),
              "replay_epochs": replay_tokens / (len(data.train) * seq_len)}
    console().print(f"replay mix: {domain_loss:,} trained SFT tokens (of {domain_tokens:,}) + {replay_tokens:,} "
                    f"general tokens ({report['replay_epochs']:.2f} epochs of the replay data) = "
                    f"{report['replay_share']:.1%} of the trained tokens")
    return ChatReplay(report, validation)
