"""The loss in tiles: the same losses and gradients as from the whole logits, in pretraining, CPT and
distillation, and the whole logits never built."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.helpers import read_metrics, tiny_recipe

REL = 1e-5


def _model(vocab=97, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        tie_word_embeddings=True, use_cache=False))  # as in training: packed masks


def _packed_batch(vocab=97):
    """Two packed rows of documents: positions restart at each document, its first token is no target."""
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    labels = ids.clone()
    labels[:, 10] = -100
    labels[1, 20:] = -100
    return {"input_ids": ids, "position_ids": positions}, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-12)
        assert ((a[name] - b[name]).abs().max() / scale).item() < REL, name


def test_the_fused_head_gives_the_models_loss_and_gradients():
    from lmlab.models.tiled import add_tiled_head, has_tiled_head

    plain, tiled = _model(), _model()
    add_tiled_head(tiled)
    assert has_tiled_head(tiled) and not has_tiled_head(plain)
    inputs, labels = _packed_batch()
    items = torch.tensor(40)  # the Trainer's token count over a whole step: the loss is divided by it
    a = plain(**inputs, labels=labels, num_items_in_batch=items).loss
    b = tiled(**inputs, labels=labels, num_items_in_batch=items, fused_lm_head=True).loss
    assert b.item() == pytest.approx(a.item(), rel=REL)
    a.backward()
    b.backward()
    _assert_close(_grads(plain), _grads(tiled))
    assert tiled(**inputs).logits.shape == (2, 24, 97)  # without the flag: the model's own forward (generation)


def test_chunked_cross_entropy_gives_the_models_loss_and_gradients(monkeypatch):
    import lmlab.models.tiled as tiled_module
    import lmlab.plan.memory as plan_memory

    monkeypatch.setattr(plan_memory, "TILE_LOGITS_BYTES", 5 * 4 * 97)  # 5 tokens a chunk: 9 chunks here
    plain, tiled = _model(), _model()
    inputs, labels = _packed_batch()
    a = plain(**inputs, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    b = tiled_module.chunked_cross_entropy(tiled, inputs, labels, torch.tensor(40))
    assert b.item() == pytest.approx(a.item(), rel=REL)
    a.backward()
    b.backward()
    _assert_close(_grads(plain), _grads(tiled))


def test_row_log_probabilities_are_the_same_from_tiles():
    from lmlab.models.tiled import add_tiled_head, row_token_logprobs

    plain, tiled = _model(), _model()
    add_tiled_head(tiled)
    inputs, labels = _packed_batch()
    with torch.no_grad():
        a, b = row_token_logprobs(plain, inputs, labels), row_token_logprobs(tiled, inputs, labels)
        logits = plain(**inputs).logits[:, :-1]
    assert a.shape == (2, 23) and torch.allclose(a, b, rtol=REL, atol=1e-6)
    assert (a[labels[:, 1:] == -100] == 0).all()
    keep = labels[:, 1:] != -100
    whole = torch.log_softmax(logits, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(a[keep], whole[keep], rtol=REL, atol=1e-6)


def _distill_self(student, teacher, cache=None, top_k=None):
    from lmlab.stages.distill import DistillTrainer

    self = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), teacher=teacher, alpha=0.3,
                           temperature=2.0, top_k=top_k, cache=cache)
    self.cached_teacher = lambda rows, labels: DistillTrainer.cached_teacher(self, rows, labels)
    return self


@pytest.mark.parametrize("teacher_kind", ["model", "model_top_k", "ensemble", "cache"])
def test_tiled_distillation_equals_the_loss_on_whole_logits(teacher_kind, monkeypatch):
    import lmlab.plan.memory as plan_memory
    from lmlab.models.ensemble import EnsembleCausalLM
    from lmlab.stages.distill import DistillTrainer, distillation_loss, from_top_k, teacher_top_k

    monkeypatch.setattr(plan_memory, "TILE_LOGITS_BYTES", 7 * 4 * 97)  # 7 tokens: several chunks, the last short
    inputs, labels = _packed_batch()
    teacher = EnsembleCausalLM([_model(seed=2), _model(seed=3)]) if teacher_kind == "ensemble" else _model(seed=2)
    top_k = 5 if teacher_kind in ("model_top_k", "cache") else None
    cache, rows = None, None
    if teacher_kind == "cache":
        with torch.no_grad():
            idx, logp = teacher_top_k(teacher(**inputs).logits, 2.0, 5)
        cache, rows = {"indices": idx.to(torch.int32), "logprobs": logp}, torch.tensor([0, 1])
    plain_student, tiled_student = _model(seed=4), _model(seed=4)
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    teacher_logp = from_top_k(cache["indices"], cache["logprobs"], 97) if cache else None
    a = distillation_loss(plain_student(**inputs).logits, None if cache else teacher_logits, labels, 0.3, 2.0, top_k,
                          teacher_logp=teacher_logp, num_items=40)
    b = DistillTrainer.tiled_loss(_distill_self(tiled_student, teacher, cache, top_k), tiled_student, inputs, labels,
                                  rows, 40)
    assert b.item() == pytest.approx(a.item(), rel=REL)
    a.backward()
    b.backward()
    _assert_close(_grads(plain_student), _grads(tiled_student))


def _losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r and "train_loss" not in r}


def _same_run(make, tiling: str = "chunks") -> None:
    """One recipe trained with and without tiles: every logged loss and the validation losses agree."""
    from lmlab.artifacts import read_manifest
    from lmlab.stages import run_stage

    tiled, plain = make("tiled", True), make("plain", False)
    assert read_manifest(run_stage(tiled))["loss_tiling"] == tiling
    assert read_manifest(run_stage(plain))["loss_tiling"] == "off"
    a, b = _losses(tiled.run_dir), _losses(plain.run_dir)
    assert a.keys() == b.keys() and len(a) >= 6
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4), step  # 1e-5 per step, compounded over the run
    evals = [[v for r in read_metrics(run.run_dir) for k, v in sorted(r.items())
              if k.startswith("eval_") and k.endswith("_loss")] for run in (tiled, plain)]  # CPT: domain and replay
    assert evals[0] and evals[0] == pytest.approx(evals[1], rel=1e-4)


@pytest.mark.parametrize("tiling", ["chunks", "fused"])  # CPU takes lmlab's chunks; CUDA TRL's fused head
def test_pretraining_with_and_without_tiles_trains_the_same(tmp_path, tok_dir, tiling, monkeypatch):
    import lmlab.stages.packed as packed

    monkeypatch.setattr(packed, "tiling_for", lambda requested, tokens, vocab: tiling if requested else "off")
    _same_run(lambda name, tiles: tiny_recipe(tmp_path, tok_dir, name=name, train={"max_steps": 6, "tiled_loss": tiles}),
              tiling)


def test_cpt_with_replay_with_and_without_tiles_trains_the_same(tmp_path, base_model):
    _same_run(lambda name, tiles: tiny_recipe(
        tmp_path, None, name=name, stage="cpt", tokenizer={}, model={"from_pretrained": str(base_model)},
        data={"train": {"kind": "math", "num_examples": 300}, "replay": {"kind": "general", "limit": 100},
              "replay_ratio": 0.25, "validation_fraction": 0.05},
        train={"max_steps": 6, "eval_every": 3, "eval_batches": 2, "tiled_loss": tiles}))


def test_distillation_with_and_without_tiles_trains_the_same(tmp_path, base_model):
    _same_run(lambda name, tiles: tiny_recipe(
        tmp_path, None, name=name, stage="distill", tokenizer={},
        distill={"teacher": str(base_model), "alpha": 0.5, "temperature": 2.0, "top_k": 8},
        train={"max_steps": 6, "eval_every": 3, "tiled_loss": tiles}))
