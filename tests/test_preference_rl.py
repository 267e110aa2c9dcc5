"""Reward functions, the reward-model, DPO/KTO/ORPO and RL stages on tiny models, and their bad input."""

from __future__ import annotations

import json

import pytest

from lmlab.errors import LmlabError
from lmlab.evaluate.orm import math_format
from tests.helpers import read_metrics, tiny_recipe

SYSTEM = "You are a careful assistant who solves arithmetic problems step by step."


def post_recipe(tmp_path, base, stage, name=None, **blocks):
    tree = dict(stage=stage, tokenizer={}, model={"from_pretrained": str(base)},
                data={"train": {"kind": "math", "num_examples": 16}, "seq_len": 96},
                train={"max_steps": 4, "micro_batch_size": 4, "save_every": 2, "keep_last": 3},
                rl={"num_generations": 4})
    for key, value in blocks.items():
        tree[key] = {**tree[key], **value} if isinstance(tree.get(key), dict) else value
    return tiny_recipe(tmp_path, None, name=name or stage, **tree)


def write_pairs_file(path, n=12):
    with path.open("w") as fh:
        for i in range(n):
            prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {i} + 2?"}]
            fh.write(json.dumps({"prompt": prompt,
                                 "chosen": [{"role": "assistant", "content": f"{i} + 2 = {i + 2}. The answer is {i + 2}."}],
                                 "rejected": [{"role": "assistant", "content": f"The answer is {i + 5}."}]}) + "\n")
    return path


def held_out_margin(checkpoint) -> float:
    """Mean log-probability of the chosen answer minus the rejected one over pairs like write_pairs_file's
    but on numbers it never writes (30-37), under the checkpoint's own chat template."""
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.likelihood import continuation_logprobs
    from lmlab.models.build import load_model

    model, tokenizer = load_model(checkpoint), load_tokenizer(checkpoint)
    contexts, chosen, rejected = [], [], []
    for i in range(30, 38):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {i} + 2?"}]
        contexts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        chosen.append(f"{i} + 2 = {i + 2}. The answer is {i + 2}.")
        rejected.append(f"The answer is {i + 5}.")
    good = continuation_logprobs(model, tokenizer, contexts, chosen)
    bad = continuation_logprobs(model, tokenizer, contexts, rejected)
    return sum(g - b for (g, _), (b, _) in zip(good, bad)) / len(good)


def test_format_reward_wants_the_canonical_ending():
    assert math_format([""] * 4, ["3 + 4 = 7. The answer is 7.", "The answer is -12", "7", "The answer is 7. ok"],
                       [{}] * 4) == [1.0, 1.0, 0.0, 0.0]


def test_trl_reward_reads_chat_completions_and_answers(base_model):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.stages.rl import trl_reward

    reward = trl_reward("math_exact", load_tokenizer(base_model))
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2
    completions = [[{"role": "assistant", "content": "The answer is 4."}],
                   [{"role": "assistant", "content": "The answer is 5."}]]
    assert reward(prompts, completions, answer=[4, 4]) == [1.0, 0.0]
    assert reward.__name__ == "math_exact"


def test_reward_model_with_another_tokenizer_is_refused(tmp_path, base_model, tok_dir):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.orm import load_scorer
    from tests.test_orm import _reward_model

    rm = _reward_model(tmp_path, tok_dir, 1)  # the 512-token fixture tokenizer, not the base model's
    with pytest.raises(LmlabError, match="tokenizer differs from the policy's"):
        load_scorer(str(rm), load_tokenizer(base_model))


def test_bad_preference_and_rl_inputs_fail_before_compute(tmp_path, base_model):
    from lmlab.stages.preference import run_preference
    from lmlab.stages.rl import prepare_rl

    pairs = write_pairs_file(tmp_path / "pairs.jsonl")
    with pytest.raises(LmlabError, match="rounds need prompts"):
        run_preference(post_recipe(tmp_path, base_model, "dpo", data={"train": {"kind": "jsonl", "path": str(pairs)}},
                                   preference={"rounds": 2}))
    with pytest.raises(LmlabError, match="give prompts, not preference pairs"):
        prepare_rl(post_recipe(tmp_path, base_model, "rl", name="rl1",
                               data={"train": {"kind": "jsonl", "path": str(pairs)}}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi"}) + "\n")
    with pytest.raises(LmlabError, match="no integer 'answer', which the math_exact reward needs"):
        prepare_rl(post_recipe(tmp_path, base_model, "rl", name="rl2",
                               data={"train": {"kind": "jsonl", "path": str(prompts)}}))
    with pytest.raises(LmlabError, match="multiple of rl.num_generations"):
        prepare_rl(post_recipe(tmp_path, base_model, "rl", name="rl3", train={"micro_batch_size": 6},
                               rl={"num_generations": 4}))
    with pytest.raises(LmlabError, match="unknown scorer"):
        prepare_rl(post_recipe(tmp_path, base_model, "rl", name="rl4", rl={"rewards": ["vibes"]}))


def test_rl_recipe_validates_reward_weights(tmp_path, base_model):
    with pytest.raises(LmlabError, match="2 reward_weights for 1 rewards"):
        post_recipe(tmp_path, base_model, "rl", rl={"reward_weights": [1.0, 2.0]})


@pytest.mark.parametrize("stage,extra", [("dpo", {"loss_type": ["sigmoid", "ipo"]}), ("dpo", {"loss_type": "apo_zero"}),
                                         ("kto", {}), ("orpo", {})])
def test_preference_stages_train_on_pairs_and_write_artifacts(tmp_path, base_model, stage, extra):
    from lmlab.artifacts import read_manifest
    from lmlab.stages.preference import run_preference

    pairs = write_pairs_file(tmp_path / "pairs.jsonl")
    recipe = post_recipe(tmp_path, base_model, stage, data={"train": {"kind": "jsonl", "path": str(pairs)}},
                         preference=extra, optim={"lr": 5e-3}, train={"max_steps": 6, "log_every": 1})
    final = run_preference(recipe)
    manifest = read_manifest(final)
    assert manifest["stage"] == stage and manifest["rounds"][0]["steps"] == 6
    assert (final / "model.safetensors").is_file() and (final / "chat_template.jinja").is_file()
    logged = [r for r in read_metrics(recipe.run_dir) if "loss" in r]
    assert logged and all(r["stage"] == stage and r["round"] == 1 for r in logged)
    # learned, on pairs it never saw: the worked answer gains log-probability over the bare wrong one
    before, after = held_out_margin(base_model), held_out_margin(final)
    assert after > before + 5.0, (before, after)  # swapped pairs: DPO -22 nats, ORPO +3.5 (its NLL lifts both)


def test_default_lr_is_the_input_models_lr_over_ten_unless_the_recipe_sets_one(base_model):
    """docs/rules.md §5: preference optimisation and RL train 5-20x below the SFT LR (the base used 1e-2)."""
    from lmlab.models.build import load_model
    from lmlab.loading import validate_recipe
    from lmlab.stages.posttrain import fine_tuning_lr

    model = load_model(base_model)
    tree = {"name": "d", "stage": "dpo", "model": {"from_pretrained": str(base_model)}}
    assert fine_tuning_lr(validate_recipe(tree), model, 0.1) == pytest.approx(1e-3)
    assert fine_tuning_lr(validate_recipe({**tree, "optim": {"lr": 5e-6}}), model, 0.1) == 5e-6


def test_someone_elses_checkpoint_gets_the_literatures_fine_tuning_lr(tmp_path):
    """Not an lmlab artifact: full SFT, LoRA and DPO LRs from docs/rules.md §4-5 for the model's size, and a
    warning for an LR far outside that range (3e-3, lmlab's tiny-model default, would wreck a real model)."""
    from lmlab.models.build import load_model
    from lmlab.loading import validate_recipe
    from lmlab.stages.posttrain import fine_tuning_lr
    from tests.families import family_checkpoint

    checkpoint = family_checkpoint("qwen3", tmp_path / "qwen3")
    model = load_model(checkpoint)  # tens of thousands of parameters: the sub-1B row
    tree = {"name": "s", "stage": "sft", "model": {"from_pretrained": str(checkpoint)}}
    full = fine_tuning_lr(validate_recipe(tree), model, from_previous=False)
    assert 3e-5 <= full <= 1e-4
    lora = fine_tuning_lr(validate_recipe({**tree, "lora": {"enabled": True}}), model, from_previous=False)
    assert 5e-4 <= lora <= 1e-3
    dpo = fine_tuning_lr(validate_recipe({**tree, "stage": "dpo"}), model, 0.1)
    assert dpo == pytest.approx(full * 0.1, rel=0.05)
    with pytest.warns(UserWarning, match="optim.lr 3.0e-03 is far from the usual"):
        fine_tuning_lr(validate_recipe({**tree, "optim": {"lr": 3e-3}}), model, from_previous=False)


def test_dpo_pairs_improve_the_chosen_margin(tmp_path, base_model):
    """A few DPO steps on fixed pairs raise the implicit reward margin of chosen over rejected."""
    from lmlab.stages.preference import run_preference

    pairs = write_pairs_file(tmp_path / "pairs.jsonl", n=16)
    recipe = post_recipe(tmp_path, base_model, "dpo", data={"train": {"kind": "jsonl", "path": str(pairs)}},
                         optim={"lr": 5e-3}, train={"max_steps": 8, "log_every": 1})
    run_preference(recipe)
    margins = [r["rewards/margins"] for r in read_metrics(recipe.run_dir) if "rewards/margins" in r]
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the first step
    assert margins[-1] > 0.05


def test_reward_model_stage_learns_pairs_and_scores_like_an_orm(tmp_path, base_model):
    from lmlab.artifacts import read_manifest
    from lmlab.evaluate.orm import RewardModelScorer
    from lmlab.stages.rm import run_reward_model

    pairs = write_pairs_file(tmp_path / "pairs.jsonl", n=40)
    recipe = post_recipe(tmp_path, base_model, "rm", data={"train": {"kind": "jsonl", "path": str(pairs)},
                                                           "seq_len": 160},
                         optim={"lr": 5e-3}, train={"max_steps": 12, "micro_batch_size": 8, "eval_every": 12},
                         sft={"validation_fraction": 0.25})
    final = run_reward_model(recipe)
    manifest = read_manifest(final)
    assert manifest["stage"] == "rm" and manifest["held_out_pairs"] >= 5 and manifest["overlong_dropped"] == 0
    # a worked answer against a bare wrong one is learnable in a few steps: the held-out pairs rank right
    assert manifest["metrics"]["eval_accuracy"] >= 0.8, manifest["metrics"]
    accuracy = manifest["pairwise_accuracy"]  # with its interval over the held-out pairs
    assert accuracy["value"] == manifest["metrics"]["eval_accuracy"] and accuracy["n"] == manifest["held_out_pairs"]
    assert accuracy["ci_low"] < accuracy["value"] <= accuracy["ci_high"]
    scorer = RewardModelScorer(final)
    good, bad = scorer(["What is 3 + 2?"] * 2, ["3 + 2 = 5. The answer is 5.", "The answer is 8."], [{}, {}])
    assert good > bad


def test_pairwise_accuracy_is_above_chance_only_when_its_interval_is():
    from lmlab.stages.rm import pairwise_accuracy

    assert pairwise_accuracy(0.7, 20)["above_chance"] is False  # 14 of 20: Wilson [0.48, 0.85]
    assert pairwise_accuracy(0.7, 200)["above_chance"] is True  # 140 of 200: [0.63, 0.76]
    assert pairwise_accuracy(None, 0) is None


def test_grpo_logs_reward_kl_entropy_length_and_kl_starts_at_zero(tmp_path, base_model):
    from lmlab.stages.rl import run_rl

    recipe = post_recipe(tmp_path, base_model, "rl", rl={"num_generations": 4, "beta": 0.1, "rewards": ["math_format"],
                                                          "max_completion_length": 16},
                         train={"max_steps": 2, "micro_batch_size": 8, "log_every": 1})
    final = run_rl(recipe)
    logged = [r for r in read_metrics(recipe.run_dir) if "reward" in r]
    assert [r["step"] for r in logged] == [1, 2]
    first = logged[0]
    for key in ("reward", "kl", "entropy", "completions/mean_length", "rewards/math_format/mean"):
        assert key in first, key
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # policy == reference before the first update
    assert (final / "model.safetensors").is_file()
    from lmlab.data.tokenizer import load_tokenizer

    assert load_tokenizer(final).eos_token == "<|endoftext|>"  # RL's chat-turn EOS does not leak into the artifact


def test_rloo_runs_without_a_reference_when_beta_is_zero(tmp_path, base_model):
    from lmlab.stages.rl import prepare_rl, run_rl

    recipe = post_recipe(tmp_path, base_model, "rl", rl={"algorithm": "rloo", "num_generations": 4, "beta": 0.0,
                                                          "rewards": ["math_format"], "max_completion_length": 12},
                         train={"max_steps": 1, "micro_batch_size": 4, "log_every": 1})
    assert prepare_rl(recipe)[0].ref_model is None  # beta 0: no reference model is built or held in memory
    with_kl = post_recipe(tmp_path, base_model, "rl", name="with_kl", rl={"algorithm": "rloo", "num_generations": 4,
                                                                          "beta": 0.05, "rewards": ["math_format"]},
                          train={"max_steps": 1, "micro_batch_size": 4})
    assert prepare_rl(with_kl)[0].ref_model is not None  # and the check above can fail
    run_rl(recipe)
    assert any("reward" in r for r in read_metrics(recipe.run_dir))


def test_a_resumed_rl_run_continues_from_its_step(tmp_path, base_model):
    from transformers import TrainerCallback

    from lmlab.stages.rl import prepare_rl, run_rl

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise RuntimeError("killed")

    recipe = post_recipe(tmp_path, base_model, "rl", rl={"num_generations": 4, "rewards": ["math_format"],
                                                          "max_completion_length": 12},
                         train={"max_steps": 4, "micro_batch_size": 4, "log_every": 1, "save_every": 2})
    trainer = prepare_rl(recipe)[0]
    trainer.add_callback(Crash())
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train()
    steps_before = [r["step"] for r in read_metrics(recipe.run_dir) if "reward" in r]
    run_rl(recipe, resume=True)
    steps_after = [r["step"] for r in read_metrics(recipe.run_dir) if "reward" in r][len(steps_before):]
    assert steps_before == [1, 2] and steps_after == [3, 4]  # resumed from checkpoint-2, not from step 0


def _policy_reward_model(tmp_path, policy):
    """A randomly initialised reward model on the policy's tokenizer: continuous scores, so sampled answers
    never tie and every prompt gives a pair (a tiny policy answers every math prompt wrong, which ties)."""
    import shutil

    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from lmlab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(policy)
    torch_seed = __import__("torch").manual_seed(0)
    del torch_seed
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    out = tmp_path / "policy_rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (policy / name).is_file():
            shutil.copy(policy / name, out / name)
    return out


def test_on_policy_dpo_rounds_sample_fresh_pairs_and_each_round_starts_at_its_reference(tmp_path, base_model):
    """recipes/math_dpo.yaml's path: prompts, not pairs; each round samples from the current policy, a
    learned reward model ranks the samples, and DPO trains one epoch against the round's starting policy."""
    from lmlab.stages.preference import run_preference

    scorer = _policy_reward_model(tmp_path, base_model)
    recipe = post_recipe(tmp_path, base_model, "dpo", data={"train": {"kind": "math", "format": "prompt",
                                                                      "num_examples": 8, "seed": 7}},
                         preference={"rounds": 2, "samples": 3, "scorer": str(scorer), "max_new_tokens": 12},
                         optim={"lr": 5e-3}, train={"max_steps": None, "epochs": 1, "micro_batch_size": 4,
                                                    "log_every": 1})
    final = run_preference(recipe)
    rounds = [[json.loads(line) for line in (recipe.run_dir / f"round-{r}" / "pairs.jsonl").read_text().splitlines()]
              for r in (1, 2)]
    assert len(rounds[0]) == len(rounds[1]) == 8  # continuous scores: one pair per prompt in each round
    assert [p["chosen"] for p in rounds[0]] != [p["chosen"] for p in rounds[1]]  # fresh samples, not a replay
    logged = [r for r in read_metrics(recipe.run_dir) if "rewards/margins" in r]
    firsts = [next(r for r in logged if r["round"] == n) for n in (1, 2)]
    # the second round's reference is the first round's model: its first margins are zero again
    assert [f["rewards/margins"] for f in firsts] == [pytest.approx(0.0, abs=1e-6)] * 2
    assert any(abs(r["rewards/margins"]) > 1e-4 for r in logged if r["round"] == 1)  # and the check can fail
    assert (final / "model.safetensors").is_file()


def test_on_policy_dpo_with_the_verifier_samples_and_scores_before_it_can_refuse(tmp_path, base_model):
    """The README's `lmlab dpo recipes/math_dpo.yaml` scorer: a barely trained policy answers every prompt
    wrong, so all of its samples tie, which is one error line after sampling (not a crash before it)."""
    from lmlab.stages.preference import run_preference

    recipe = post_recipe(tmp_path, base_model, "dpo", data={"train": {"kind": "math", "format": "prompt",
                                                                      "num_examples": 4}},
                         preference={"rounds": 2, "samples": 2, "scorer": "math_exact", "max_new_tokens": 8})
    with pytest.raises(LmlabError, match="round 1: every prompt's 2 samples scored the same"):
        run_preference(recipe)


def _adapter(tmp_path, base_model):
    """A LoRA SFT adapter trained far enough to move the model away from its base."""
    from lmlab.stages.sft import run_sft

    return run_sft(post_recipe(tmp_path, base_model, "sft", name="lora_sft", lora={"enabled": True, "r": 4, "alpha": 8},
                               optim={"lr": 2e-2}, data={"train": {"kind": "math", "num_examples": 48}},
                               train={"max_steps": 6}, sft={"eval_math": 0}))


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("stage", ["rl", "dpo"])
def test_the_reference_is_the_policys_starting_weights_for_checkpoints_and_adapters(tmp_path, base_model, stage):
    """RL and DPO from a LoRA adapter: the reference is base + adapter, never the adapter's base."""
    import torch

    from lmlab.models.build import load_model
    from lmlab.stages.posttrain import load_policy, prepare_tokenizer
    from lmlab.stages.preference import preference_trainer
    from lmlab.stages.rl import prepare_rl

    adapter = _adapter(tmp_path, base_model)
    ids = torch.randint(5, 300, (2, 16))
    assert not torch.allclose(_logits(load_model(adapter), ids), _logits(load_model(base_model), ids), atol=1e-3)
    pairs = write_pairs_file(tmp_path / "pairs.jsonl")
    for start in (base_model, adapter):
        recipe = post_recipe(tmp_path, start, stage, name=f"{stage}_{start.parent.name}", rl={"beta": 0.1})
        if stage == "rl":
            trainer = prepare_rl(recipe)[0]
        else:  # as run_preference builds its first round's trainer
            tokenizer = prepare_tokenizer(recipe)
            given = [json.loads(line) for line in pairs.read_text().splitlines()]
            trainer = preference_trainer(recipe, load_policy(recipe, tokenizer), tokenizer, given,
                                         recipe.run_dir / "checkpoints", 1e-3)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        reference = trainer.accelerator.unwrap_model(trainer.ref_model)
        assert torch.allclose(_logits(reference, ids), _logits(policy, ids), atol=1e-5), start
        assert torch.allclose(_logits(reference, ids), _logits(load_model(start), ids), atol=1e-5), start


def test_grpo_from_an_adapter_starts_with_zero_kl(tmp_path, base_model):
    from lmlab.stages.rl import run_rl

    adapter = _adapter(tmp_path, base_model)
    recipe = post_recipe(tmp_path, adapter, "rl", name="rl_adapter",
                         rl={"num_generations": 4, "beta": 0.1, "rewards": ["math_format"], "max_completion_length": 12},
                         train={"max_steps": 1, "micro_batch_size": 4, "log_every": 1})
    run_rl(recipe)
    first = next(r for r in read_metrics(recipe.run_dir) if "kl" in r)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # against the adapter's base it was far from zero


def test_rl_difficulty_filter_trains_on_the_prompts_the_policy_does_not_always_solve(tmp_path, base_model,
                                                                                      monkeypatch):
    """rl.filter: each candidate sampled `samples` times by the starting policy; only pass rates in
    [min, max) are trained on; the rates are saved and a resumed run reuses them; a filter that keeps
    nothing, or one over a reward model's scores, stops with one error."""
    from lmlab.evaluate import onpolicy, orm
    from lmlab.stages.rl import prepare_rl, rl_prompts

    monkeypatch.setitem(orm.VERIFIERS, "even_length", lambda prompts, responses, items:
                        [float(len(r) % 2 == 0) for r in responses])
    monkeypatch.setitem(orm.VERIFIERS, "always", lambda prompts, responses, items: [1.0] * len(responses))

    def recipe(name, rewards, **filter_):
        return post_recipe(tmp_path, base_model, "rl", name=name, data={"train": {"kind": "math", "num_examples": 24},
                                                                        "seq_len": 96},
                           rl={"num_generations": 4, "rewards": rewards, "max_completion_length": 6,
                               "filter": {"samples": 4, **filter_}},
                           train={"max_steps": 1, "micro_batch_size": 4})

    mixed = recipe("mixed", ["even_length"], min_pass_rate=0.25, max_pass_rate=1.0)
    trainer = prepare_rl(mixed)[0]
    rates = json.loads((mixed.run_dir / "prompt_filter.json").read_text())["pass_rates"]
    assert len(rates) == 24 and set(rates) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    kept = [i for i, rate in enumerate(rates) if 0.25 <= rate < 1.0]
    assert 0 < len(kept) < 24, rates  # random lengths: some prompts pass always or never, others sometimes
    candidates = rl_prompts(mixed)["prompt"]
    assert trainer.train_dataset["prompt"] == [candidates[i] for i in kept]
    assert trainer.prompt_filter["kept"] == len(kept) and trainer.prompt_filter["candidates"] == 24

    def never_again(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(onpolicy, "pass_rates", never_again)
    assert prepare_rl(mixed)[0].train_dataset["prompt"] == [candidates[i] for i in kept]  # resumed: the saved rates
    monkeypatch.undo()
    monkeypatch.setitem(orm.VERIFIERS, "always", lambda prompts, responses, items: [1.0] * len(responses))
    with pytest.raises(LmlabError, match="rl.filter kept none of the 24 prompts"):
        prepare_rl(recipe("solved", ["always"]))
    with pytest.raises(LmlabError, match="is a reward model, whose scores have no pass mark"):
        prepare_rl(recipe("rm", ["math_exact", str(base_model)]))


def test_a_reward_model_can_learn_from_another_models_samples(tmp_path, base_model, monkeypatch):
    """preference.policy: the pairs are the policy's samples, ranked by the verifier, while the reward model
    starts from model.from_pretrained; only the rm stage takes it, and a missing policy is refused first."""
    import shutil

    import lmlab.models.build as build
    from lmlab.stages.preflight import check_artifacts
    from lmlab.stages.rm import run_reward_model

    from types import SimpleNamespace

    import lmlab.evaluate.onpolicy as onpolicy

    policy = tmp_path / "policy"
    shutil.copytree(base_model, policy)
    loaded, sampled_by = [], []
    real = build.load_model
    monkeypatch.setattr(build, "load_model", lambda path, *a, **k: loaded.append(str(path)) or real(path, *a, **k))
    # the tiny model answers no sum right, so its samples tie: the given pairs train, the sampler is observed
    monkeypatch.setattr(onpolicy, "sample_pairs", lambda model, *a, **k: sampled_by.append(model) or (
        [], SimpleNamespace(pairs=0, prompts=4, ties_dropped=4)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "chosen": f"The answer is {i + 2}.",
                                         "rejected": f"The answer is {i + 5}."}) + "\n" for i in range(20)))
    data = {"train": [{"kind": "jsonl", "path": str(pairs)},
                      {"kind": "math", "format": "prompt", "num_examples": 4, "split": "id"}], "seq_len": 160}
    recipe = post_recipe(tmp_path, base_model, "rm", data=data, train={"max_steps": 2, "micro_batch_size": 8},
                         preference={"policy": str(policy), "samples": 2, "max_new_tokens": 8},
                         sft={"validation_fraction": 0.25})
    run_reward_model(recipe)
    assert loaded == [str(policy)] and len(sampled_by) == 1  # the policy sampled; the RM started from base_model
    dpo = post_recipe(tmp_path, base_model, "dpo", preference={"policy": str(policy)})
    with pytest.raises(LmlabError, match="only a reward model samples its pairs from another model"):
        check_artifacts(dpo, set())
    missing = post_recipe(tmp_path, base_model, "rm", data=data, preference={"policy": str(tmp_path / "nope")})
    with pytest.raises(LmlabError) as error:
        check_artifacts(missing, set())
    assert error.value.field == "preference.policy"
