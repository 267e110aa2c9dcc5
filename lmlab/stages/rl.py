"""RL with verifiable and/or learned rewards on TRL's GRPOTrainer or RLOOTrainer.

lmlab adds the lifecycle: rewards named in the recipe (built-in verifiers or
reward-model directories) wrapped for TRL and checked to return numbers, prompts
in the same chat format SFT trained on, the group size checked against the batch
before compute, the LR derived from the SFT LR, the shared callbacks (TRL's
reward, KL, entropy and completion length land in metrics.jsonl) and the
artifact format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lmlab.artifacts import stop_at_end_of_turn
from lmlab.console import console
from lmlab.recipe import Recipe


def trl_reward(spec: str, policy_tokenizer) -> Callable:
    """A scorer (verifier or reward model) as a TRL reward function `(prompts, completions, **columns)`."""
    from lmlab.evaluate.orm import checked_scores, load_scorer

    scorer = load_scorer(spec, policy_tokenizer)

    def reward(prompts, completions, **columns) -> list[float]:
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rendered = [policy_tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                    if isinstance(p, list) else p for p in prompts]
        answers = columns.get("answer") or [None] * len(responses)
        return checked_scores(scorer, rendered, responses, [{"answer": a} for a in answers])

    reward.__name__ = Path(spec).name if Path(spec).is_dir() else spec  # TRL logs rewards/<name>/mean
    return reward


def rl_prompts(recipe: Recipe):
    """Conversational prompts (with the answer column verifiers read), checked against the rewards: a
    disk-backed table, so a large prompt set is neither held in RAM nor converted again on a resume."""
    from lmlab.data.pairs import preference_inputs, prompt_messages
    from lmlab.data.records import cached_map, records_fingerprint
    from lmlab.stages.posttrain import check_rl_inputs

    pairs, prompts = preference_inputs(recipe.data.train, recipe.seed)
    check_rl_inputs(recipe, pairs, prompts)

    def conversational(batch):
        return {"prompt": [prompt_messages(p, s) for p, s in zip(batch["prompt"], batch["system"])]}

    return cached_map(prompts, conversational, records_fingerprint(prompts._fingerprint, "rl-prompts"),
                      remove_columns=["system"])


def filter_by_difficulty(recipe: Recipe, model, tokenizer, prompts) -> tuple[object, dict]:
    """The prompts whose pass rate under the starting policy lies in rl.filter's range, and what was kept.

    The rates are written to the run directory (`prompt_filter.json`), so a resumed run trains on the same
    prompts without sampling them again."""
    import json

    from lmlab.distributed import is_main
    from lmlab.errors import LmlabError
    from lmlab.evaluate.onpolicy import pass_rates
    from lmlab.evaluate.orm import load_scorer
    from lmlab.paths import write_json_atomic

    r, f = recipe.rl, recipe.rl.filter
    settings = {"candidates": len(prompts), "samples": f.samples, "temperature": r.temperature,
                "max_completion_length": r.max_completion_length, "seed": recipe.seed,
                "from": str(recipe.model.from_pretrained)}
    saved = recipe.run_dir / "prompt_filter.json"
    found = json.loads(saved.read_text()) if saved.is_file() else {}
    if found.get("settings") == settings:
        rates = found["pass_rates"]
    else:
        rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                    for p in prompts["prompt"]]
        answers = prompts["answer"] if "answer" in prompts.column_names else [None] * len(prompts)
        scorers = [load_scorer(spec, tokenizer) for spec in r.rewards]  # verifiers (check_rl_inputs)
        with console().status(f"difficulty filter: {f.samples} samples of {len(prompts):,} prompts"):
            rates = pass_rates(model, tokenizer, rendered, [{"answer": a} for a in answers], scorers, f.samples,
                               r.temperature, r.max_completion_length, seed=recipe.seed)
        if is_main():
            write_json_atomic(saved, {"settings": settings, "pass_rates": rates})
    kept = [i for i, rate in enumerate(rates) if f.min_pass_rate <= rate < f.max_pass_rate]
    record = {"candidates": len(rates), "kept": len(kept), "mean_pass_rate": sum(rates) / max(1, len(rates)),
              "mean_pass_rate_kept": sum(rates[i] for i in kept) / max(1, len(kept))}
    if not kept:
        raise LmlabError(f"rl.filter kept none of the {len(rates):,} prompts: their pass rates under the starting "
                         f"policy (mean {record['mean_pass_rate']:.2f}) all lie outside [{f.min_pass_rate}, "
                         f"{f.max_pass_rate})", field="rl.filter",
                         hint="give more or harder prompts, or widen the pass-rate range")
    console().print(f"difficulty filter: {len(kept):,} of {len(rates):,} prompts kept (pass rate over "
                    f"{f.samples} samples in [{f.min_pass_rate}, {f.max_pass_rate}); mean "
                    f"{record['mean_pass_rate']:.3f} over all, {record['mean_pass_rate_kept']:.3f} over those kept)")
    return prompts.select(kept), record


def prepare_rl(recipe: Recipe):
    """Prompts, rewards, model and trainer; every input check happens here, before compute."""
    from lmlab.models.build import to_own_device
    from lmlab.stages.arguments import steps_over_examples, training_arguments
    from lmlab.stages.common import stage_callbacks
    from lmlab.stages.posttrain import fine_tuning_lr, load_policy, lora_config, prepare_tokenizer
    from lmlab.trainers import lmlab_trainer

    r, t = recipe.rl, recipe.train
    tokenizer = prepare_tokenizer(recipe)
    prompts = rl_prompts(recipe)
    rewards = [trl_reward(spec, tokenizer) for spec in r.rewards]
    model = load_policy(recipe, tokenizer)
    # TRL ends a completion at every EOS id of the generation config: the template's end of turn too
    stop_at_end_of_turn(model, tokenizer)
    filtered = None
    if r.filter is not None:
        prompts, filtered = filter_by_difficulty(recipe, to_own_device(model), tokenizer, prompts)
    lr = fine_tuning_lr(recipe, model, r.lr_ratio)
    steps = steps_over_examples(t, len(prompts), per_example=r.num_generations)  # completions per step
    if r.algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Base
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Base
    args = training_arguments(
        recipe, recipe.run_dir / "checkpoints", steps, False, args_class=Config, learning_rate=lr,
        num_generations=r.num_generations, beta=r.beta, temperature=r.temperature,
        max_completion_length=r.max_completion_length, epsilon=r.epsilon, reward_weights=r.reward_weights,
        log_completions=False,
    )

    peft = lora_config(recipe, len(prompts), model) if recipe.lora.enabled else None
    trainer = lmlab_trainer(Base)(model=model, reward_funcs=rewards, args=args, train_dataset=prompts,
                      processing_class=tokenizer, peft_config=peft)
    stage_callbacks(trainer, recipe, tokenizer)
    console().print(f"[bold]{recipe.name}[/]: {r.algorithm} on {len(prompts):,} prompts, groups of "
                    f"{r.num_generations}, KL beta {r.beta}, rewards {', '.join(r.rewards)}, lr {lr:.2e}, "
                    f"{steps} steps")
    trainer.prompt_filter = filtered  # for the manifest
    return trainer, tokenizer, lr


def run_rl(recipe: Recipe, resume: bool = False, overwrite: bool = False, checked=None) -> Path:
    """Train with RL as the recipe says; returns the final artifact directory."""
    from lmlab.stages.loop import save_final, stage_manifest, train
    from lmlab.stages.rundir import open_stage

    start = open_stage(recipe, resume, overwrite, checked=checked)
    trainer, tokenizer, lr = prepare_rl(recipe)
    train(trainer, start)
    model = trainer.model.merge_and_unload() if recipe.lora.enabled else trainer.model
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    manifest = stage_manifest(recipe, lr=lr, steps=trainer.state.global_step, prompt_filter=trainer.prompt_filter,
                              reward_first=rewards[0] if rewards else None, reward_last=rewards[-1] if rewards else None)
    final = save_final(trainer, tokenizer, recipe.run_dir / "final", manifest,
                       model=model if recipe.lora.enabled else None)
    console().print(f"[bold green]HF checkpoint:[/] {final}")
    return final
