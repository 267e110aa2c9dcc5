"""Preference optimisation on TRL: DPO (sigmoid, ipo, apo_zero, ... and their sums), KTO and ORPO.

lmlab adds the lifecycle around TRL's trainers: pairs checked before compute,
iterative rounds that each sample fresh on-policy pairs from the current policy
and train one epoch on them (docs/rules.md §5: preference optimisation overfits
after one epoch), the LR derived from the SFT LR, the shared callbacks and the
artifact format. Each round's model is saved, so `--resume` continues after the
last finished round.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmlab.console import console
from lmlab.distributed import barrier, is_main
from lmlab.errors import LmlabError
from lmlab.paths import write_json_atomic
from lmlab.recipe import Recipe

DONE = "round.json"


def preference_trainer(recipe: Recipe, model, tokenizer, pairs: list[dict[str, Any]], out_dir: Path, lr: float,
                       peft_config=None):
    """TRL's trainer for the recipe's method, over one round's pairs (given ones: a disk-backed table)."""
    from lmlab.data.pairs import pairs_table, unpaired
    from lmlab.stages.arguments import steps_over_examples, training_arguments
    from lmlab.trainers import lmlab_trainer

    p, t = recipe.preference, recipe.train
    pairs = pairs_table(pairs)
    common: dict[str, Any] = dict(learning_rate=lr, num_train_epochs=t.epochs or 1, max_length=recipe.data.seq_len,
                                  beta=p.beta, dataset_num_proc=None)
    if recipe.stage == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Base

        common.update(loss_type=p.loss_type)
        data = pairs
    elif recipe.stage == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Base

        data = unpaired(pairs)
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Base

        data = pairs
    max_steps = t.max_steps or -1
    args = training_arguments(recipe, out_dir, max_steps, False, args_class=Config, **common)
    args.warmup_steps = int(recipe.optim.warmup_ratio * steps_over_examples(t, len(data)))
    kwargs = dict(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    return lmlab_trainer(Base)(**kwargs)


def _finished_rounds(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob(f"round-*/{DONE}"))


def preference_data(recipe: Recipe, tokenizer):
    """(given pairs, prompts to sample from, scorer), checked against the number of rounds."""
    from lmlab.data.pairs import preference_inputs
    from lmlab.evaluate.orm import load_scorer
    from lmlab.stages.posttrain import check_preference_inputs

    given, prompts = preference_inputs(recipe.data.train, recipe.seed)
    check_preference_inputs(recipe, given, prompts)
    return given, prompts, load_scorer(recipe.preference.scorer, tokenizer) if prompts else None


def round_pairs(recipe: Recipe, model, tokenizer, prompts, scorer, round_no: int, round_dir: Path):
    """One round's pairs sampled from the current policy and ranked, with the round's record."""
    from lmlab.data.pairs import write_pairs
    from lmlab.evaluate.onpolicy import sample_pairs

    p = recipe.preference
    pairs, stats = sample_pairs(model, tokenizer, prompts, scorer, p.samples, p.temperature, p.max_new_tokens,
                                seed=recipe.seed * 1000 + round_no)
    if is_main():
        write_pairs(pairs, round_dir / "pairs.jsonl")
    console().print(f"round {round_no}: {stats.pairs} on-policy pairs from {stats.prompts} prompts "
                    f"({stats.ties_dropped} ties dropped; mean best {stats.mean_best:.3f}, "
                    f"worst {stats.mean_worst:.3f})")
    if not pairs:
        raise LmlabError(f"round {round_no}: every prompt's {p.samples} samples scored the same, so there "
                         "is no preference to learn", field="preference.samples",
                         hint="raise preference.samples or preference.temperature, or use easier prompts")
    return pairs, {"round": round_no, **stats.as_dict()}


def train_round(recipe: Recipe, model, tokenizer, pairs, record: dict[str, Any], round_dir: Path, lr: float,
                resume: bool):
    """One epoch on one round's pairs; the round's model and record are saved; returns (trainer, policy)."""
    from lmlab.stages.common import stage_callbacks
    from lmlab.stages.loop import save_final, train
    from lmlab.stages.posttrain import lora_config
    from lmlab.trainers import last_checkpoint

    peft = lora_config(recipe, len(pairs), model) if recipe.lora.enabled else None
    trainer = preference_trainer(recipe, model, tokenizer, pairs, round_dir / "checkpoints", lr, peft)
    stage_callbacks(trainer, recipe, tokenizer, round=record["round"])
    train(trainer, last_checkpoint(round_dir / "checkpoints") if resume else None)
    model = trainer.model.merge_and_unload() if recipe.lora.enabled else trainer.model  # the next round's policy
    save_final(trainer, tokenizer, round_dir / "model", {"stage": recipe.stage, "round": record["round"]},
               model=model if recipe.lora.enabled else None)
    record.update(steps=trainer.state.global_step,
                  train_loss=next((h["train_loss"] for h in reversed(trainer.state.log_history)
                                   if "train_loss" in h), None))
    if is_main():
        write_json_atomic(round_dir / DONE, record)
    barrier()
    return trainer, model


def run_preference(recipe: Recipe, resume: bool = False, overwrite: bool = False, checked=None) -> Path:
    """Rounds of (sample on-policy pairs ->) train one epoch; returns the final artifact."""
    from lmlab.models.build import load_model
    from lmlab.stages.loop import save_final, stage_manifest
    from lmlab.stages.rundir import open_stage
    from lmlab.stages.posttrain import fine_tuning_lr, load_policy, prepare_tokenizer

    out, p, run_dir = console(), recipe.preference, recipe.run_dir
    open_stage(recipe, resume, overwrite, checked=checked)
    tokenizer = prepare_tokenizer(recipe)
    given, prompts, scorer = preference_data(recipe, tokenizer)
    done = _finished_rounds(run_dir) if resume else []
    model = load_model(run_dir / f"round-{done[-1]}" / "model") if done else load_policy(recipe, tokenizer)
    lr = fine_tuning_lr(recipe, model, p.lr_ratio)
    out.print(f"[bold]{recipe.name}[/]: {recipe.stage} (beta {p.beta}"
              + (f", loss {'+'.join(p.loss_type)}" if recipe.stage == "dpo" else "")
              + f", lr {lr:.2e}), {p.rounds} round(s)" + (f", resuming after round {done[-1]}" if done else ""))
    history: list[dict[str, Any]] = [json.loads((run_dir / f"round-{r}" / DONE).read_text()) for r in done]
    trainer = None  # stays None when a resume finds every round done
    for round_no in range(len(done) + 1, p.rounds + 1):
        round_dir = run_dir / f"round-{round_no}"
        pairs, record = round_pairs(recipe, model, tokenizer, prompts, scorer, round_no, round_dir) if prompts \
            else (given, {"round": round_no, "pairs": len(given)})
        trainer, model = train_round(recipe, model, tokenizer, pairs, record, round_dir, lr, resume)
        # the next round's reference is the policy it starts from (as a resume loads it): TRL builds the
        # reference from `_name_or_path`, which still named the first round's input
        model.config._name_or_path = str((round_dir / "model").resolve())
        history.append(record)
    manifest = stage_manifest(recipe, lr=lr, rounds=history)
    final = save_final(trainer, tokenizer, run_dir / "final", manifest,
                       model=model if recipe.lora.enabled or trainer is None else None)
    out.print(f"[bold green]HF checkpoint:[/] {final}")
    return final
