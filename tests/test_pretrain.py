"""The pretraining stage end to end on tiny models: artifacts, metrics, resume, architectures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmlab.errors import LmlabError
from tests.helpers import read_metrics, tiny_recipe


def test_pretrain_writes_hf_artifact_metrics_and_falling_validation_loss(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    recipe = tiny_recipe(tmp_path, tok_dir, train={"max_steps": 30, "eval_every": 10})
    final = run_pretrain(recipe)
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    assert json.loads((final / "lmlab.json").read_text())["stage"] == "pretrain"
    logs = read_metrics(recipe.run_dir)
    train = [r for r in logs if "loss" in r]
    assert {"loss", "learning_rate", "grad_norm", "tokens_seen", "tokens_per_s"} <= set(train[-1])
    evals = [r["eval_loss"] for r in logs if "eval_loss" in r]
    assert len(evals) >= 3 and evals[-1] < evals[0]
    assert any((recipe.run_dir / "tensorboard").iterdir())
    # two checkpoints kept, written whole
    kept = sorted(p.name for p in (recipe.run_dir / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-28", "checkpoint-30"] or len(kept) == 2
    assert not (recipe.run_dir / "checkpoints" / ".staging").exists()


def test_checkpoint_loads_and_generates_in_plain_transformers(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    final = run_pretrain(tiny_recipe(tmp_path, tok_dir, train={"max_steps": 3}))
    code = (
        "import sys; sys.modules['lmlab'] = None\n"  # prove lmlab is not needed to load it
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(final)!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(final)!r})\n"
        "ids = tok('def main(', return_tensors='pt')\n"
        "out = model.generate(**ids, max_new_tokens=5, do_sample=False)\n"
        "assert out.shape[1] == ids['input_ids'].shape[1] + 5, out.shape\n"
        "print(tok.decode(out[0]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_weight_decay_skips_embeddings_norms_and_biases(tmp_path, tok_dir):
    from lmlab.stages.packed import prepare_packed as prepare_pretrain

    job = prepare_pretrain(tiny_recipe(tmp_path, tok_dir))
    decayed = set(job.trainer.get_decay_parameter_names(job.trainer.model))
    assert "model.embed_tokens.weight" not in decayed
    assert not any("norm" in name for name in decayed)
    assert "model.layers.0.self_attn.q_proj.weight" in decayed


def test_training_runs_with_kv_cache_off_so_packed_masks_apply(tmp_path, tok_dir):
    from lmlab.stages.packed import prepare_packed as prepare_pretrain

    job = prepare_pretrain(tiny_recipe(tmp_path, tok_dir))
    assert job.trainer.model.config.use_cache is False


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "mixtral"])
def test_other_architectures_train(tmp_path, tok_dir, arch):
    from lmlab.stages.pretrain import run_pretrain

    model = {"arch": arch, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    recipe = tiny_recipe(tmp_path, tok_dir, model=model, train={"max_steps": 8, "eval_every": 100})
    final = run_pretrain(recipe)
    losses = [r["loss"] for r in read_metrics(recipe.run_dir) if "loss" in r]
    assert all(l == l for l in losses) and losses[-1] < losses[0]
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == arch


def test_z_loss_adds_a_positive_penalty(tmp_path, tok_dir):
    import torch

    from lmlab.stages.packed import prepare_packed as prepare_pretrain, z_loss_function

    job = prepare_pretrain(tiny_recipe(tmp_path, tok_dir))
    batch = {k: v.unsqueeze(0) for k, v in job.data.train[0].items()}
    model = job.trainer.model
    outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    plain = z_loss_function(0.0, model.config.vocab_size)(outputs, batch["labels"])
    with_z = z_loss_function(1e-2, model.config.vocab_size)(outputs, batch["labels"])
    reference = model(**batch).loss
    assert torch.allclose(plain, reference, atol=1e-5)
    assert with_z > plain


def test_budget_from_tokens_per_param(tmp_path, tok_dir):
    from lmlab.stages.arguments import training_budget

    recipe = tiny_recipe(tmp_path, tok_dir, train={"max_steps": None, "tokens_per_param": 2.0})
    budget = training_budget(recipe.train, recipe.data.seq_len, n_params=10_000, train_tokens=100_000)
    assert budget.tokens_per_step == 4 * 64
    assert budget.max_steps == -(-20_000 // 256) and budget.epochs == pytest.approx(budget.tokens / 100_000)


def test_existing_run_needs_resume_or_overwrite(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    recipe = tiny_recipe(tmp_path, tok_dir, train={"max_steps": 2})
    run_pretrain(recipe)
    with pytest.raises(LmlabError, match="--resume"):
        run_pretrain(recipe)
    run_pretrain(recipe, overwrite=True)


def test_vocab_mismatch_with_checkpoint_fails_before_loading(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10,
                                                  "max_position_embeddings": 256}))
    recipe = tiny_recipe(tmp_path, tok_dir, model={"from_pretrained": str(ckpt)})
    with pytest.raises(LmlabError, match="vocabulary has 10"):
        run_pretrain(recipe)


def test_seq_len_above_checkpoint_maximum_fails(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 100_000,
                                                  "max_position_embeddings": 32}))
    with pytest.raises(LmlabError, match="exceeds the model's maximum"):
        run_pretrain(tiny_recipe(tmp_path, tok_dir, model={"from_pretrained": str(ckpt)}))


def test_a_failed_save_leaves_no_checkpoint_behind(tmp_path, tok_dir, monkeypatch):
    import lmlab.trainers as trainers
    from lmlab.stages.packed import prepare_packed as prepare_pretrain

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(trainers, "fsync_tree", crash)
    job = prepare_pretrain(tiny_recipe(tmp_path, tok_dir, train={"max_steps": 4, "save_every": 2}))
    with pytest.raises(OSError):
        job.trainer.train()
    checkpoints = job.recipe.run_dir / "checkpoints"
    assert trainers.last_checkpoint(checkpoints) is None
    assert not list(checkpoints.glob("checkpoint-*"))


def _cli(recipe_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmlab.cli", "pretrain", str(recipe_path), *extra]


def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, tok_dir):
    import yaml

    def write(name):
        recipe = tiny_recipe(tmp_path, tok_dir, name=name,
                             train={"max_steps": 24, "save_every": 4, "eval_every": 100, "keep_last": 3})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
        return recipe, path

    from lmlab.stages import run_stage

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full, _ = write("full")
    run_stage(full)  # the uninterrupted reference, in this process

    killed, killed_path = write("killed")
    proc = subprocess.Popen(_cli(killed_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed.run_dir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (checkpoints / "checkpoint-8").is_dir():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed.run_dir / "final").exists(), "the run was killed before it finished"
    from lmlab.trainers import last_checkpoint

    saved = int(last_checkpoint(checkpoints).name.split("-")[1])  # 8, or later if the kill came late
    killed_at = time.time()
    resumed_run = subprocess.run(_cli(killed_path, "--resume"), check=True, env=env, capture_output=True,
                                 text=True, timeout=600)
    assert f"resuming from {checkpoints / f'checkpoint-{saved}'}" in resumed_run.stdout.replace("\n", "")

    # each step is logged once; the steps up to the checkpoint were trained before the kill and never redone,
    # the later ones after it (the resume drops the killed run's records past its checkpoint)
    logged = [r for r in read_metrics(killed.run_dir) if "loss" in r and "train_loss" not in r]
    assert [r["step"] for r in logged] == list(range(1, 25))
    assert all(r["time"] < killed_at for r in logged if r["step"] <= saved)
    assert all(r["time"] > killed_at for r in logged if r["step"] > saved)

    def losses(recipe):
        return {r["step"]: r["loss"] for r in read_metrics(recipe.run_dir) if "loss" in r}

    reference, resumed = losses(full), losses(killed)
    for step in range(saved + 1, 25):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step


def test_streaming_data_trains_with_a_token_budget(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    recipe = tiny_recipe(tmp_path, tok_dir, data={"streaming": True, "shuffle_buffer": 50},
                         train={"max_steps": None, "tokens": 4 * 64 * 5})
    final = run_pretrain(recipe)
    assert json.loads((final / "lmlab.json").read_text())["steps"] == 5


def test_streaming_without_a_budget_is_an_error(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    recipe = tiny_recipe(tmp_path, tok_dir, data={"streaming": True}, train={"max_steps": None})
    with pytest.raises(LmlabError, match="give a budget"):
        run_pretrain(recipe)


def test_cpu_runs_log_mfu_against_a_measured_matmul_peak(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    recipe = tiny_recipe(tmp_path, tok_dir, train={"max_steps": 4})
    run_pretrain(recipe)
    mfu = [r["mfu"] for r in read_metrics(recipe.run_dir) if "mfu" in r]
    assert mfu and all(0 < m < 1 for m in mfu)  # a fraction of the measured peak, never above it


def test_wsd_schedule_warms_up_holds_then_decays(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    recipe = tiny_recipe(tmp_path, tok_dir, optim={"schedule": "wsd", "warmup_ratio": 0.2, "decay_ratio": 0.3,
                                                   "min_lr_ratio": 0.0, "lr": 1e-2},
                         train={"max_steps": 20})
    run_pretrain(recipe)
    lr = {r["step"]: r["learning_rate"] for r in read_metrics(recipe.run_dir) if "learning_rate" in r}
    # logged values are the LR each step used: warm-up over steps 1-4, stable, cosine decay over the last 6
    assert lr[1] < lr[2] < lr[4] < lr[5] == pytest.approx(1e-2)
    assert lr[8] == lr[14] == pytest.approx(1e-2)
    assert 1e-2 > lr[16] > lr[18] > lr[20] > 0


def test_training_continues_from_a_local_checkpoint(tmp_path, tok_dir):
    from lmlab.stages.pretrain import run_pretrain

    first = run_pretrain(tiny_recipe(tmp_path, tok_dir, name="first", train={"max_steps": 20}))
    second = tiny_recipe(tmp_path, tok_dir, name="second", tokenizer={"path": None},
                         model={"from_pretrained": str(first)}, train={"max_steps": 2, "eval_every": 1})
    run_pretrain(second)
    first_loss = json.loads((first / "lmlab.json").read_text())["metrics"]["eval_loss"]
    start_loss = next(r["eval_loss"] for r in read_metrics(second.run_dir) if "eval_loss" in r)
    assert start_loss == pytest.approx(first_loss, rel=0.1)  # not a fresh model (that would be ~ln(vocab))


def test_unique_tokens_is_one_fixed_subset_for_every_seed(tiny_tokenizer):
    from lmlab.data.pretrain_data import build_packed_data
    from lmlab.recipe import DataConfig

    data = DataConfig(train={"kind": "general", "limit": 300}, seq_len=64, validation_fraction=0.05,
                      unique_tokens=3000)
    a = build_packed_data(data, tiny_tokenizer, seed=0, max_validation_rows=8)
    b = build_packed_data(data, tiny_tokenizer, seed=1, max_validation_rows=8)
    assert a.train_rows == b.train_rows == 47  # ceil(3000 / 64)
    assert a.train.to_dict() == b.train.to_dict()  # the same rows; the trainer's sampler orders them by seed
    full = build_packed_data(DataConfig(train={"kind": "general", "limit": 300}, seq_len=64,
                                        validation_fraction=0.05), tiny_tokenizer, seed=0, max_validation_rows=8)
    assert len(full.train) > 47 and set(map(tuple, a.train.to_dict()["input_ids"])) <= \
        set(map(tuple, full.train.to_dict()["input_ids"]))
    assert a.validation.to_dict() == full.validation.to_dict()
    with pytest.raises(LmlabError, match="unique_tokens"):
        build_packed_data(DataConfig(train={"kind": "general", "limit": 300}, seq_len=64, unique_tokens=10 ** 9),
                          tiny_tokenizer, 0, 8)


def test_resume_refuses_a_changed_recipe_unless_forced_and_names_the_keys(tmp_path, tok_dir):
    from lmlab.stages import run_stage

    recipe = tiny_recipe(tmp_path, tok_dir, train={"max_steps": 4, "save_every": 2})
    run_stage(recipe)
    changed = tiny_recipe(tmp_path, tok_dir, optim={"lr": 5e-3}, data={"seq_len": 32},
                          train={"max_steps": 4, "save_every": 2})
    with pytest.raises(LmlabError, match=r"optim\.lr.*data\.seq_len|data\.seq_len.*optim\.lr") as err:
        run_stage(changed, resume=True)
    assert "--force" in str(err.value)
    logging_only = tiny_recipe(tmp_path, tok_dir, train={"max_steps": 4, "save_every": 2, "log_every": 3})
    run_stage(logging_only, resume=True)  # how often it logs is not what the run is
    run_stage(tiny_recipe(tmp_path, tok_dir, optim={"lr": 5e-3}, train={"max_steps": 4, "save_every": 2}),
              resume=True, force=True)


def test_a_second_job_on_a_running_stage_directory_is_refused(tmp_path, tok_dir):
    from lmlab.paths import run_lock
    from lmlab.stages import run_stage

    recipe = tiny_recipe(tmp_path, tok_dir)
    with run_lock(recipe.run_dir):
        with pytest.raises(LmlabError, match=r"another lmlab process \(PID \d+\) is running in this directory"):
            run_stage(recipe)
