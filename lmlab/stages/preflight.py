"""Every input of a stage, read and checked before anything is written or computed.

A pipeline whose last stage has a malformed data line must fail before its first
stage trains, and `--overwrite` must not delete a run whose replacement cannot start.
So each stage's data files are read to the last line (in the layout the stage will
read them), its task files loaded, its checkpoints' config, weights header and
tokenizer opened, its reward models found, and a fresh model's fields built into
a transformers config on the meta device, where transformers' own checks run.
Paths an earlier pipeline stage will write are checked when that stage has run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import json
from pathlib import Path
from typing import Iterable

from lmlab.errors import LmlabError
from lmlab.models.build import check_checkpoint
from lmlab.recipe import LOCAL_KINDS, Recipe, SourceSpec
from lmlab.stages.speed import check_speed_options

CHAT_STAGES = ("sft",)
PAIR_STAGES = ("rm", "dpo", "kto", "orpo", "rl")


@dataclass(frozen=True)
class Checked:
    """What preflight has established for one recipe, handed on from check to stage as a value: a
    pipeline's preflight reads the data once, the stage checks what did not exist then, and nothing is
    checked twice (nor remembered in module globals)."""

    data: bool = False  # every data source and task read to its last record
    artifacts: bool = False  # checkpoints, tokenizers, scorers and templates checked, all of them existing
    force: bool = False  # --force: a resume may continue a run whose recipe changed


def check_inputs(recipe: Recipe, future: Iterable[str] = (), checked: Checked | None = None) -> Checked:
    """Raise the first problem in any input of `recipe` as one LmlabError naming its file, line and field;
    returns what is now checked (pass it on). `future` are artifacts earlier pipeline stages will write:
    they are checked when the stage opens."""
    checked = checked or Checked()
    if checked.data and checked.artifacts:
        return checked
    if not checked.data:
        check_data(recipe)
    future = {str(p) for p in future}
    check_artifacts(recipe, future)
    return replace(checked, data=True, artifacts=not future)


# the modes whose ranks hold only a shard of each weight between steps
PARAMETER_SHARDING = ("zero2", "zero3", "zero3_offload", "zero3_hybrid", "deepspeed_zero3", "deepspeed_zero3_offload",
                      "deepspeed_zero3_offload_optimizer")


def check_data(recipe: Recipe) -> None:
    """Data sources to their last record, task files, and preference / RL data as those stages use it."""
    from lmlab.evaluate.tasks import load_task

    for spec in _sources(recipe):
        check_source(spec, recipe)
    for task in recipe.eval.tasks:
        load_task(task, recipe.eval.n)
    sharded = recipe.train.distributed in PARAMETER_SHARDING
    if sharded and (recipe.eval.tasks or (recipe.stage == "sft" and recipe.sft.eval_math)):
        raise LmlabError(f"evaluation during training generates with whole weights on every rank, and "
                         f"train.distributed: {recipe.train.distributed} shards them (each forward pass would be a "
                         "collective, and ranks with different generation lengths would wait on each other)",
                         field="eval.tasks" if recipe.eval.tasks else "sft.eval_math",
                         hint="evaluate the saved model with `lmlab eval --nproc N`, or train under ddp")
    if recipe.stage in PAIR_STAGES:
        check_pairs_and_prompts(recipe)


def check_artifacts(recipe: Recipe, future: set[str]) -> None:
    """Checkpoints, tokenizers, reward models, a fresh model's fields and the optimizer name."""
    if recipe.model.from_pretrained and recipe.model.from_pretrained not in future:
        check_checkpoint_fits(recipe)
    directories = [("model.from_pretrained", recipe.model.from_pretrained), ("distill.teacher", recipe.distill.teacher),
                   ("tokenizer.path", recipe.tokenizer.path)]
    directories += [("rl.rewards", r) for r in recipe.rl.rewards if recipe.stage == "rl"]
    directories += [("preference.scorer", recipe.preference.scorer)] if recipe.stage in PAIR_STAGES else []
    if recipe.preference.policy and recipe.stage != "rm":
        raise LmlabError("only a reward model samples its pairs from another model", field="preference.policy",
                         hint="drop preference.policy: this stage samples from the model it trains")
    directories += [("preference.policy", recipe.preference.policy)] if recipe.preference.policy else []
    directories += [("eval.orm", recipe.eval.orm)] if recipe.eval.orm else []
    for field, path in directories:
        named_directory = field.endswith(("pretrained", "teacher", "path", "policy"))  # scorers may be verifiers
        if path and str(path) not in future and (named_directory or Path(path).is_dir()):
            check_checkpoint(Path(path), field, tokenizer_only=field == "tokenizer.path",
                             needs_tokenizer=not (field == "model.from_pretrained" and recipe.tokenizer.path),
                             trust_remote_code=recipe.model.trust_remote_code and field == "model.from_pretrained")
    policy, base = recipe.preference.policy, recipe.tokenizer.path or recipe.model.from_pretrained
    if policy and recipe.stage == "rm" and base and not {policy, base} & future:
        from lmlab.data.tokenizer import load_tokenizer
        from lmlab.evaluate.orm import check_same_tokenizer

        check_same_tokenizer(load_tokenizer(base), load_tokenizer(policy), policy, "preference.policy")
    if recipe.stage in PAIR_STAGES + CHAT_STAGES and recipe.model.from_pretrained not in future:
        from lmlab.stages.posttrain import prepare_tokenizer

        prepare_tokenizer(recipe)  # the chat template exists and marks assistant turns
    if not recipe.model.from_pretrained and recipe.stage in ("pretrain", "distill"):
        check_model_fields(recipe)
    check_optimizer(recipe.optim.optimizer)
    check_speed_options(recipe)


def _sources(recipe: Recipe) -> list[SourceSpec]:
    d = recipe.data
    return [*d.train, *(d.validation or []), *(d.replay or []), *(recipe.tokenizer.train_sources or [])]


def check_source(spec: SourceSpec, recipe: Recipe) -> None:
    """Read a local source to its last record, as the stage will read it."""
    if spec.kind not in LOCAL_KINDS:
        return  # embedded corpora are generated; hub sources cannot be read before they are fetched
    chat = recipe.stage in CHAT_STAGES or (recipe.stage == "distill" and recipe.distill.data_format == "chat")
    if chat and spec in recipe.data.train:
        from lmlab.data.chat import chat_records

        if not sum(1 for _ in chat_records(spec, recipe.sft.layout, recipe.seed)):  # every record, to the last
            raise LmlabError("the chat data has no records", file=spec.path, field="data.train")
        return
    if recipe.stage in PAIR_STAGES and spec in recipe.data.train:
        return  # read with the stage's other pair and prompt checks, in check_pairs_and_prompts
    from lmlab.data.sources import source_rows
    from lmlab.data.store import was_checked

    if was_checked(spec, recipe.seed):
        return  # a token store was built from exactly these files, reading every record
    if not sum(1 for _ in source_rows(spec)):
        raise LmlabError("the source has no documents", file=spec.path, field="data")


def check_pairs_and_prompts(recipe: Recipe) -> None:
    """Preference and RL data as those stages will use it: pairs or prompts, never a mix, enough of them."""
    from lmlab.data.pairs import preference_inputs

    pairs, prompts = preference_inputs(recipe.data.train, recipe.seed)
    where = next((s.path for s in recipe.data.train if s.path), None)
    if not pairs and not prompts:
        raise LmlabError("the data has no records", file=where, field="data.train")
    if recipe.stage == "rl":
        from lmlab.stages.posttrain import check_rl_inputs

        check_rl_inputs(recipe, pairs, prompts)
    elif recipe.stage != "rm":
        from lmlab.stages.posttrain import check_preference_inputs

        check_preference_inputs(recipe, pairs, prompts)


def check_checkpoint_fits(recipe: Recipe) -> None:
    """Vocabulary and context checks against a local checkpoint's config, before its weights are read."""
    from lmlab.models.build import adapter_base, is_adapter

    checkpoint = Path(recipe.model.from_pretrained)
    config_path = (adapter_base(checkpoint) if is_adapter(checkpoint) else checkpoint) / "config.json"  # an adapter: its base's
    if not config_path.is_file():
        raise LmlabError("not a HF checkpoint: config.json is missing", file=recipe.model.from_pretrained,
                         field="model.from_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LmlabError(f"config.json is not valid JSON ({exc})", file=str(config_path),
                         field="model.from_pretrained") from None
    config = config.get("text_config", config)
    vocab = config.get("vocab_size")
    tokenizer_dir = Path(recipe.tokenizer.path or recipe.model.from_pretrained)
    if vocab is not None and (tokenizer_dir / "tokenizer.json").is_file() and len(_tokenizer(tokenizer_dir)) > vocab:
        raise LmlabError(f"tokenizer has {len(_tokenizer(tokenizer_dir))} tokens but the model's vocabulary has "
                         f"{vocab}",
                         file=str(config_path), field="vocab_size",
                         hint="use the tokenizer saved with the checkpoint")
    max_pos = config.get("max_position_embeddings")
    if max_pos is not None and recipe.data.seq_len > max_pos:
        raise LmlabError(f"data.seq_len ({recipe.data.seq_len}) exceeds the model's maximum ({max_pos})",
                         file=str(config_path), field="max_position_embeddings")


def _tokenizer(directory: Path):
    from lmlab.data.tokenizer import load_tokenizer

    return load_tokenizer(directory)


def check_model_fields(recipe: Recipe) -> None:
    """The model block as transformers would build it, on the meta device: its own checks run, nothing allocates."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmlab.models.build import attention_kernel, build_config

    cfg = recipe.model

    class Vocabulary:  # the config needs only the vocabulary's size and special ids, known after tokenizer training
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self) -> int:
            return recipe.tokenizer.vocab_size

    try:
        config = build_config(cfg, Vocabulary())
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, attn_implementation=attention_kernel(cfg.attn_implementation))
    except LmlabError:
        raise
    except Exception as exc:  # transformers' message says what is wrong; the field is the model block
        raise LmlabError(f"transformers rejects this model: {str(exc).splitlines()[0]}", field="model") from None


def check_optimizer(name: str) -> None:
    from transformers.training_args import OptimizerNames

    known = [o.value for o in OptimizerNames]
    if name not in ("auto", "muon") and name not in known:
        raise LmlabError(f"unknown optimizer '{name}'", field="optim.optimizer",
                         hint="auto, muon, or an HF Trainer `optim` name, e.g. adamw_torch, adamw_torch_fused, "
                              "adafactor")
