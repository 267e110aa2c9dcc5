"""Continued pretraining: exact replay accounting, and replay protecting general ability."""

from __future__ import annotations

import json

from lmlab.data.pretrain_data import repeat_indices
from tests.helpers import tiny_recipe


def cpt_recipe(tmp_path, base, ratio, name, steps=40):
    return tiny_recipe(tmp_path, None, name=name, stage="cpt", tokenizer={},
                       model={"from_pretrained": str(base)},
                       data={"train": {"kind": "math", "num_examples": 3000}, "replay": {"kind": "general", "limit": 300},
                             "replay_ratio": ratio, "validation_fraction": 0.05},
                       optim={"lr": 1e-2, "warmup_ratio": 0.1},
                       train={"max_steps": steps, "eval_every": 100, "save_every": 100, "eval_batches": 4})


def test_repeat_indices_cover_whole_passes_before_repeating():
    idx = repeat_indices(5, 12, seed=0).tolist()
    assert sorted(idx[:5]) == list(range(5)) and sorted(idx[5:10]) == list(range(5)) and len(idx) == 12


def test_replay_share_is_exact_and_reported(tmp_path, base_model):
    from lmlab.stages.pretrain import run_pretrain

    final = run_pretrain(cpt_recipe(tmp_path, base_model, 0.16, "mix", steps=25))
    manifest = json.loads((final / "lmlab.json").read_text())
    mix = manifest["replay_mix"]
    rows = 25 * 4  # steps x micro-batch
    assert mix["replay_tokens"] == round(0.16 * rows) * 64
    assert mix["domain_tokens"] + mix["replay_tokens"] == rows * 64
    assert mix["domain_epochs"] > 0 and mix["replay_epochs"] > 0
    assert "eval_replay_loss" in manifest["metrics_before"] and "eval_domain_loss" in manifest["metrics"]


def test_replay_rows_come_from_the_replay_source_and_domain_rows_from_the_domain(tmp_path, base_model):
    """Every training row the trainer will see is a window of one source's token store: exactly
    round(0.16 x rows) of the general (replay) store, the rest of the math (domain) store."""
    from lmlab.data.pretrain_data import build_packed_data, replay_block
    from lmlab.stages.packed import prepare_packed

    recipe = cpt_recipe(tmp_path, base_model, 0.16, "sources", steps=25)
    job = prepare_packed(recipe)
    rows = job.trainer.train_dataset
    seen = [tuple(r) for r in rows.columns(range(len(rows)))["input_ids"].tolist()]

    def windows(block):
        store = build_packed_data(block, job.tokenizer, recipe.seed, 0).train
        return {tuple(r) for r in store.columns(range(len(store)))["input_ids"].tolist()}

    general, math = windows(replay_block(recipe.data)), windows(recipe.data)
    assert len(seen) == 25 * 4 and not general & math
    assert sum(row in general for row in seen) == round(0.16 * len(seen))
    assert sum(row in math for row in seen) == len(seen) - round(0.16 * len(seen))
    assert all("The answer is" not in job.tokenizer.decode(row) for row in seen if row in general)


def test_replay_keeps_general_loss_lower_than_no_replay(tmp_path, base_model):
    from lmlab.stages.pretrain import run_pretrain

    losses = {}
    for ratio in (0.0, 0.16):
        final = run_pretrain(cpt_recipe(tmp_path, base_model, ratio, f"r{int(ratio * 100)}"))
        manifest = json.loads((final / "lmlab.json").read_text())
        losses[ratio] = (manifest["metrics_before"]["eval_replay_loss"], manifest["metrics"]["eval_replay_loss"])
    before = losses[0.0][0]
    assert losses[0.0][1] > before  # CPT on math alone forgets general text
    assert losses[0.16][1] < losses[0.0][1]  # replay forgets less on the same token budget
