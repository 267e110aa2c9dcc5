"""The divergence guard: bad steps are skipped, runs of them roll back at a lower LR, a diverged run never
becomes a model."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from lmlab.recipe import GuardConfig
from tests.helpers import read_metrics, tiny_recipe, tiny_recipe_file


def test_the_guard_flags_non_finite_and_spiking_steps_only():
    from lmlab.callbacks import DivergenceGuard

    guard = DivergenceGuard(GuardConfig(loss_spike=10, grad_spike=100, patience=2))
    assert guard.reason(float("nan"), 1.0) and guard.reason(5.0, float("inf"))  # always, even without history
    assert guard.reason(500.0, 1.0) is None  # no history yet: a spike needs a median to be a spike
    for loss in (5.0, 4.8, 4.6):
        assert guard.skip_step(loss, 1.0) is False
    assert guard.reason(40.0, 50.0) is None  # 8x the loss, 50x the gradient norm: within bounds
    assert "loss" in guard.reason(60.0, 1.0) and "gradient" in guard.reason(4.0, 150.0)
    rl = DivergenceGuard(GuardConfig(), loss_spikes=False)  # RL / DPO losses are not cross-entropies
    for _ in range(3):
        rl.skip_step(0.01, 1.0)
    assert rl.reason(5.0, 1.0) is None


def test_mixed_source_batches_are_not_spikes():
    """CPT or SFT with general replay in small batches: most batches are learned domain rows (loss ~0.24),
    some carry general rows (loss ~2.5). Against a median (or any quantile of accepted steps) such batches
    were spikes for good: skipped, never admitted, and in a row they rolled the quickstart's SFT back twice.
    A skipped step the next step recovers from joins the history, so their kind passes from then on; a real
    blow-up is still one."""
    import random

    from lmlab.callbacks import DivergenceGuard

    guard = DivergenceGuard(GuardConfig(loss_spike=10, patience=3))
    rng = random.Random(0)
    skipped, worst_run = 0, 0
    for step in range(300):
        replay_rows = sum(rng.random() < 0.16 for _ in range(4))
        skipped += guard.skip_step((replay_rows * 5.0 + (4 - replay_rows) * 0.24) / 4, 0.5)
        worst_run = max(worst_run, guard.bad_in_a_row)
    assert skipped <= 2 and worst_run < 3  # at most the first general batches, and never a rollback
    sft = DivergenceGuard(GuardConfig(loss_spike=10, patience=3))  # SFT with replay: chat 0.08, replay 2.0
    for step in range(600):
        sft.skip_step(2.0 if rng.random() < 0.25 else 0.08, 0.5)
        assert sft.bad_in_a_row < 3, step
    assert guard.reason(3.9, 0.5) is None  # three general rows of four
    assert "loss" in guard.reason(300.0, 0.5)


def test_a_restart_after_a_rollback_is_judged_on_its_own_history():
    """Rolled back to the initial weights, the first losses are the start's again (2.8 after 0.08): the
    history of the attempt before must not call them spikes (it stopped the quickstart's SFT)."""
    from types import SimpleNamespace

    from lmlab.callbacks import DivergenceGuard

    guard = DivergenceGuard(GuardConfig(loss_spike=10))
    guard.on_train_begin(SimpleNamespace(max_grad_norm=1.0), None, None)
    for _ in range(20):
        guard.skip_step(0.08, 0.5)
    assert "loss" in guard.reason(2.8, 0.5)
    guard.on_train_begin(SimpleNamespace(max_grad_norm=1.0), None, None)  # the rollback restarts training
    assert guard.reason(2.8, 0.5) is None


def test_a_gradient_under_the_clipping_threshold_is_never_a_spike():
    """RL steps whose groups all scored alike have near-zero gradients; the first real one is no spike."""
    from types import SimpleNamespace

    from lmlab.callbacks import DivergenceGuard

    guard = DivergenceGuard(GuardConfig(grad_spike=100))
    guard.on_train_begin(SimpleNamespace(max_grad_norm=1.0), None, None)
    for _ in range(4):
        guard.skip_step(0.0, 2e-6)
    assert guard.reason(0.0, 0.85) is None  # 400,000x the median, but clipping would not even touch it
    assert "gradient" in guard.reason(0.0, 3.0)  # above the clip and 100x the median: a spike


def test_an_lr_of_100_ends_with_exit_2_logged_rollbacks_and_no_model(tmp_path):
    recipe = tiny_recipe_file(tmp_path, "blowup", optim={"lr": 100.0, "warmup_ratio": 0.0},
                              train={"max_steps": 20, "log_every": 1, "save_every": 1000})
    result = subprocess.run([sys.executable, "-m", "lmlab.cli", "pretrain", str(recipe)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    run_dir = tmp_path / "runs" / "blowup"
    assert not (run_dir / "final").exists()
    events = [r for r in read_metrics(run_dir) if "guard/event" in r]
    rollbacks = [r for r in events if r["guard/event"] == "rollback"]
    assert len(rollbacks) == 2 and [r["guard/lr"] for r in rollbacks] == [50.0, 25.0]  # halved each time
    assert sum(r["guard/event"] == "skip" for r in events) == 9  # 3 bad steps x 3 attempts


def test_a_nan_injected_mid_run_is_skipped_then_rolled_back_to_the_last_checkpoint(tmp_path, tok_dir):
    """Fault injection: weights poisoned once at step 6; the run resumes from checkpoint-4 at half the LR."""
    import torch
    from transformers import TrainerCallback

    from lmlab.stages.packed import prepare_packed
    from lmlab.stages.loop import save_final, train

    class PoisonOnce(TrainerCallback):
        done = False
        lrs: list[tuple[int, float]] = []  # (step, LR) as logged, in both attempts

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "learning_rate" in logs:
                self.lrs.append((state.global_step, logs["learning_rate"]))

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5 and not self.done:
                PoisonOnce.done = True
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    recipe = tiny_recipe(tmp_path, tok_dir, name="poisoned", optim={"lr": 1e-2, "warmup_ratio": 0.0},
                         train={"max_steps": 10, "save_every": 4, "log_every": 1, "eval_every": 100})
    job = prepare_packed(recipe)
    job.trainer.add_callback(PoisonOnce())
    train(job.trainer, None)
    final = save_final(job.trainer, job.tokenizer, recipe.run_dir / "final", {"stage": "pretrain"})
    records = read_metrics(recipe.run_dir)
    events = [r for r in records if "guard/event" in r]
    assert [e["guard/event"] for e in events] == ["skip", "skip", "skip", "rollback"]
    assert events[-1]["guard/to"].endswith("checkpoint-4") and events[-1]["guard/lr"] == pytest.approx(5e-3)
    steps = [r["step"] for r in records if "loss" in r and "train_runtime" not in r]
    assert steps == list(range(1, 11))  # steps 5-7 were redone after the rollback, and logged once
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r and r["step"] > 7)
    from safetensors.torch import load_file

    first, second = [lr for step, lr in PoisonOnce.lrs if step == 5]
    assert second == pytest.approx(first / 2)  # step 5 redone at half the LR it first ran at

    assert all(torch.isfinite(t).all() for t in load_file(str(final / "model.safetensors")).values())


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path, tok_dir):
    import torch

    from lmlab.artifacts import save_artifact
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.errors import LmlabError
    from lmlab.models.build import build_model

    recipe = tiny_recipe(tmp_path, tok_dir)
    tokenizer = load_tokenizer(tok_dir)
    model = build_model(recipe.model, tokenizer)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("inf")
    with pytest.raises(LmlabError, match="training diverged"):
        save_artifact(model, tokenizer, tmp_path / "final", {})
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.tmp").exists()
