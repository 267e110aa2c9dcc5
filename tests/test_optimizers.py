"""Muon as an optimizer choice: which parameters it takes, that it trains, checkpoints and resumes exactly,
and where it is refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmlab.errors import LmlabError
from tests.helpers import read_metrics, tiny_recipe

MUON = {"optimizer": "muon", "lr": 1e-2, "muon_lr": 0.02, "warmup_ratio": 0.1}


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(tiny_tokenizer):
    from lmlab.models.build import build_model
    from lmlab.optimizers import muon_parameters
    from lmlab.recipe import ModelConfig

    model = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64),
                        tiny_tokenizer, seed=0)
    muon, adamw = muon_parameters(model)
    params = dict(model.named_parameters())
    assert muon and all(params[n].ndim == 2 and ".layers." in n for n in muon)
    assert {n.rsplit(".", 2)[-2] for n in muon} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                    "down_proj"}
    assert "model.embed_tokens.weight" in adamw  # the tied head is the same tensor
    assert all(params[n].ndim == 1 for n in adamw if n != "model.embed_tokens.weight")  # norms
    assert set(muon) | set(adamw) == set(params) and not set(muon) & set(adamw)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_muon_pretrains_and_a_resume_from_its_checkpoint_is_bit_exact(tmp_path, tok_dir):
    from lmlab.stages import run_stage

    recipe = tiny_recipe(tmp_path, tok_dir, optim=MUON, train={"max_steps": 12, "save_every": 6, "keep_last": 3})
    final = run_stage(recipe)
    run_dir = recipe.run_dir
    logged = [m for m in read_metrics(run_dir) if "loss" in m]
    assert logged[-1]["loss"] < logged[0]["loss"] - 0.5  # it learns
    state = torch.load(run_dir / "checkpoints" / "checkpoint-6" / "optimizer.pt", weights_only=False)
    assert set(state) == {"muon", "adamw"} and state["muon"]["state"]  # Muon's momentum is checkpointed
    reference = _weights(final)
    shutil.copytree(final, tmp_path / "uninterrupted")
    # as after a crash past step 6: the later checkpoint and the final model gone
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-12")
    shutil.rmtree(final)
    run_stage(recipe, resume=True)
    resumed = _weights(final)
    assert reference.keys() == resumed.keys()
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    # a resume that restarted from step 0 with a fresh optimizer would differ, not match by accident
    shutil.rmtree(run_dir / "checkpoints" / "checkpoint-12")
    optimizer_file = run_dir / "checkpoints" / "checkpoint-6" / "optimizer.pt"
    state["muon"]["state"] = {}
    torch.save(state, optimizer_file)
    shutil.rmtree(final)
    run_stage(recipe, resume=True)
    assert any(not torch.equal(reference[n], t) for n, t in _weights(final).items())


@pytest.mark.parametrize("distributed", ["zero2", "zero3", "deepspeed_zero3"])
def test_muon_under_a_sharding_mode_is_refused_before_compute(tmp_path, tok_dir, distributed):
    from lmlab.stages import run_stage

    recipe = tiny_recipe(tmp_path, tok_dir, optim=MUON, train={"distributed": distributed})
    with pytest.raises(LmlabError, match=rf"muon does not support train.distributed: {distributed}"):
        run_stage(recipe)
    assert not recipe.run_dir.exists()


def test_muon_runs_in_sft(tmp_path, base_model):
    from lmlab.stages import run_stage

    recipe = tiny_recipe(tmp_path, None, name="sft_muon", stage="sft", optim=MUON,
                         model={"from_pretrained": str(base_model)}, tokenizer={},
                         data={"train": {"kind": "math", "split": "id", "format": "chat", "num_examples": 16},
                               "seq_len": 96},
                         train={"max_steps": 2, "micro_batch_size": 4, "eval_every": 100, "save_every": 100},
                         sft={"eval_math": 0})
    final = run_stage(recipe)
    assert (final / "model.safetensors").is_file()
