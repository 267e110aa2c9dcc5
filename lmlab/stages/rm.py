"""Outcome reward models on TRL's RewardTrainer, from preference pairs.

The pairs come from a jsonl file, or are sampled on-policy from the input model
and ranked by a verifier (`preference.scorer`), which turns a verifiable signal
into a learned ORM that evaluation (`eval.orm`) and RL (`rl.rewards`) can use on
prompts without answers. The artifact is an HF sequence-classification checkpoint
with one output, plus the shared manifest; a held-out share of the pairs gives
its pairwise accuracy.
"""

from __future__ import annotations

from pathlib import Path

from lmlab.console import console
from lmlab.errors import LmlabError
from lmlab.recipe import Recipe


def reward_model(path: str, tokenizer, trust_remote_code: bool = False, seed: int = 0):
    """The input checkpoint with a fresh single-output head (the ORM), padding aware; a LoRA adapter is
    merged into the body of its base first. The head's initialisation follows the recipe's seed, not
    whatever the process drew before (the same recipe trains the same reward model)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    from lmlab.models.build import adapter_base, is_adapter

    set_seed(seed)
    adapter = Path(path) if is_adapter(path) else None
    model = AutoModelForSequenceClassification.from_pretrained(adapter_base(adapter) if adapter else path,
                                                               num_labels=1, use_safetensors=True,
                                                               trust_remote_code=trust_remote_code)
    if adapter is not None:  # the adapter's names are the causal LM's body, which the classifier shares
        from peft import PeftConfig, PeftModel

        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None  # a plain PeftModel: the classifier has no generation methods to wrap
        model = PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload().requires_grad_(True)
    model.config.pad_token_id = tokenizer.pad_token_id  # the score is read at the last non-pad token
    return model


def reward_pairs(recipe: Recipe, tokenizer):
    """(train, held-out or None) pair tables and the number dropped as overlong: given pairs, plus
    verifier-ranked samples."""
    import numpy as np
    from datasets import concatenate_datasets

    from lmlab.data.pairs import drop_overlong, pairs_table, preference_inputs, write_pairs
    from lmlab.data.split import doc_hash, held_out_indices
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.distributed import is_main
    from lmlab.evaluate.onpolicy import sample_pairs
    from lmlab.evaluate.orm import check_same_tokenizer, load_scorer
    from lmlab.models.build import load_model

    p, out = recipe.preference, console()
    pairs, prompts = preference_inputs(recipe.data.train, recipe.seed)
    pairs = pairs_table(pairs)
    if prompts:
        if p.scorer not in ("math_exact", "math_format"):
            raise LmlabError("a reward model learns from a verifier's rankings or from given pairs",
                             field="preference.scorer", hint="use a verifier such as math_exact, or give pairs")
        policy = p.policy or recipe.model.from_pretrained
        if p.policy:  # preflight could not check a policy that did not exist yet (a study's later run)
            check_same_tokenizer(tokenizer, load_tokenizer(p.policy), p.policy, "preference.policy")
        sampled, stats = sample_pairs(load_model(policy), tokenizer, prompts,
                                      load_scorer(p.scorer), p.samples, p.temperature, p.max_new_tokens,
                                      seed=recipe.seed)
        if is_main():
            write_pairs(sampled, recipe.run_dir / "pairs.jsonl")
        out.print(f"{stats.pairs} pairs sampled from {stats.prompts} prompts ({stats.ties_dropped} ties dropped)")
        if sampled:
            sampled = pairs_table(sampled)
            pairs = concatenate_datasets([pairs, sampled]) if len(pairs) else sampled
    if len(pairs) < 2:
        raise LmlabError(f"{len(pairs)} preference pairs: too few to train a reward model", field="data.train")
    pairs, overlong = drop_overlong(tokenizer, pairs, recipe.data.seq_len)
    if overlong:
        out.print(f"{overlong} pairs longer than data.seq_len={recipe.data.seq_len} tokens dropped")
    if len(pairs) < 2:
        raise LmlabError(f"{len(pairs)} preference pairs: too few to train a reward model", field="data.train")
    held = held_out_indices([doc_hash(f"pair-{i}") for i in range(len(pairs))], recipe.sft.validation_fraction)
    train = np.setdiff1d(np.arange(len(pairs)), held)
    return pairs.select(train), pairs.select(held) if len(held) else None, overlong


def pairwise_accuracy(accuracy: float | None, n: int) -> dict[str, float] | None:
    """The held-out pairwise accuracy with its 95% Wilson interval: above chance only when the interval is."""
    from lmlab.stats import wilson

    if accuracy is None or n == 0:
        return None
    low, high = wilson(round(accuracy * n), n)
    return {"value": accuracy, "ci_low": low, "ci_high": high, "n": n, "above_chance": low > 0.5}


def run_reward_model(recipe: Recipe, resume: bool = False, overwrite: bool = False, checked=None) -> Path:
    """Train an ORM on pairs (given, or sampled and verifier-ranked); returns the artifact directory."""
    from trl import RewardConfig, RewardTrainer

    from lmlab.stages.arguments import steps_over_examples, training_arguments
    from lmlab.stages.common import stage_callbacks
    from lmlab.stages.loop import save_final, stage_manifest, train
    from lmlab.stages.rundir import open_stage
    from lmlab.stages.posttrain import fine_tuning_lr, prepare_tokenizer
    from lmlab.trainers import lmlab_trainer

    out = console()
    start = open_stage(recipe, resume, overwrite, checked=checked)
    tokenizer = prepare_tokenizer(recipe)
    train_rows, validation, overlong = reward_pairs(recipe, tokenizer)
    model = reward_model(recipe.model.from_pretrained, tokenizer, recipe.model.trust_remote_code, recipe.seed)
    steps = steps_over_examples(recipe.train, len(train_rows))
    lr = fine_tuning_lr(recipe, model, recipe.preference.lr_ratio)  # a new head on a trained body: below SFT's
    args = training_arguments(recipe, recipe.run_dir / "checkpoints", steps, validation is not None,
                              args_class=RewardConfig, max_length=recipe.data.seq_len, dataset_num_proc=None,
                              learning_rate=lr)
    trainer = lmlab_trainer(RewardTrainer)(model=model, args=args, eval_dataset=validation,
                                           train_dataset=train_rows.shuffle(seed=recipe.seed),
                                           processing_class=tokenizer)
    stage_callbacks(trainer, recipe, tokenizer)
    held_out = len(validation) if validation is not None else 0
    out.print(f"[bold]{recipe.name}[/]: reward model on {len(train_rows):,} pairs ({held_out} held out), {steps} steps")
    train(trainer, start)
    metrics = trainer.evaluate() if validation is not None else {}
    accuracy = pairwise_accuracy(metrics.get("eval_accuracy"), held_out)
    manifest = stage_manifest(recipe, lr=lr, pairs=len(train_rows), held_out_pairs=held_out,
                              overlong_dropped=overlong, steps=trainer.state.global_step, metrics=metrics,
                              pairwise_accuracy=accuracy)
    final = save_final(trainer, tokenizer, recipe.run_dir / "final", manifest)
    if accuracy is not None:
        out.print(f"held-out pairwise accuracy {accuracy['value']:.3f} [{accuracy['ci_low']:.3f}, "
                  f"{accuracy['ci_high']:.3f}] over {held_out} pairs (chance is 0.5)")
    out.print(f"[bold green]reward model:[/] {final}")
    return final
