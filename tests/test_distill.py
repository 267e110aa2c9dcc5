"""Distillation: the loss against a hand computation, top-k truncation, and the stage from a teacher or ensemble."""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.stages.distill import distillation_loss
from tests.helpers import read_metrics, tiny_recipe


def _softmax(xs, t=1.0):
    exps = [math.exp(x / t) for x in xs]
    return [e / sum(exps) for e in exps]


def test_distillation_loss_equals_a_hand_computed_value():
    # one sequence of two tokens: position 0 predicts label 2 (position 1 is the shifted-away last token)
    student = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    teacher = torch.tensor([[[0.2, 1.0, 3.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, 2]])
    alpha, t = 0.3, 2.0
    ce = -math.log(_softmax([1.0, 2.0, 0.5])[2])
    p, q = _softmax([0.2, 1.0, 3.0], t), _softmax([1.0, 2.0, 0.5], t)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = alpha * ce + (1 - alpha) * t * t * kl
    assert distillation_loss(student, teacher, labels, alpha, t).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(student, teacher, labels, 1.0, t).item() == pytest.approx(ce, rel=1e-6)


def test_top_k_keeps_the_teachers_best_tokens_renormalised():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    full = distillation_loss(student, teacher, labels, 0.0)
    assert distillation_loss(student, teacher, labels, 0.0, top_k=7).item() == pytest.approx(full.item(), rel=1e-6)
    # k = 1: the teacher is one-hot on its argmax, so KL = -log q_student(argmax)
    argmax = teacher[:, :-1].argmax(-1)
    one_hot = -torch.log_softmax(student[:, :-1], -1).gather(-1, argmax[..., None]).mean()
    assert distillation_loss(student, teacher, labels, 0.0, top_k=1).item() == pytest.approx(one_hot.item(), rel=1e-5)


def test_a_student_learns_from_a_teacher_and_an_ensemble_teacher(tmp_path, base_model):
    from lmlab.artifacts import read_manifest
    from lmlab.models.ensemble import save_ensemble
    from lmlab.stages.distill import run_distill

    recipe = tiny_recipe(tmp_path, None, name="student", stage="distill", tokenizer={},
                         distill={"teacher": str(base_model), "alpha": 0.5, "temperature": 2.0},
                         train={"max_steps": 10, "eval_every": 5})
    final = run_distill(recipe)
    assert read_manifest(final)["stage"] == "distill"
    losses = [r["loss"] for r in read_metrics(recipe.run_dir) if "loss" in r]
    assert losses[-1] < losses[0]
    ensemble = save_ensemble([base_model, final], tmp_path / "ens")  # same tokenizer: the teacher's
    second = tiny_recipe(tmp_path, None, name="student2", stage="distill", tokenizer={},
                         distill={"teacher": str(ensemble), "top_k": 8}, train={"max_steps": 4})
    assert (run_distill(second) / "model.safetensors").is_file()


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, base_model, tok_dir):
    from lmlab.stages.distill import distill_inputs
    from lmlab.stages.packed import prepare_packed

    recipe = tiny_recipe(tmp_path, tok_dir, name="s", stage="distill", distill={"teacher": str(base_model)})
    with pytest.raises(LmlabError, match="teacher's tokenizer differs from the student's"):
        prepare_packed(recipe, *distill_inputs(recipe))
    with pytest.raises(LmlabError, match="needs distill.teacher"):
        tiny_recipe(tmp_path, None, name="s2", stage="distill")
    with pytest.raises(LmlabError, match="streamed data has no fixed rows"):
        tiny_recipe(tmp_path, None, name="s3", stage="distill", data={"streaming": True},
                    distill={"teacher": str(base_model), "top_k": 4, "cache_teacher": True})


def test_cached_top_k_gives_the_same_loss_as_the_teacher_on_the_fly():
    import torch

    from lmlab.stages.distill import distillation_loss, from_top_k, teacher_top_k

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 2] = -100
    live = distillation_loss(student, teacher, labels, alpha=0.3, temperature=2.0, top_k=4)
    cached = from_top_k(*teacher_top_k(teacher, 2.0, 4), 11)  # what cache_teacher stores, read back
    assert torch.allclose(distillation_loss(student, None, labels, 0.3, 2.0, 4, teacher_logp=cached), live)


def test_chat_distillation_with_a_cached_teacher(tmp_path, base_model):
    from safetensors.torch import load_file

    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.stages.distill import chat_data
    from lmlab.stages.distill import run_distill
    from lmlab.stages.posttrain import load_sft_data

    chat = {"train": {"kind": "math", "split": "id", "format": "chat", "num_examples": 24}, "seq_len": 192}
    recipe = tiny_recipe(tmp_path, None, name="chat_student", stage="distill", tokenizer={}, data=chat,
                         distill={"teacher": str(base_model), "top_k": 4, "cache_teacher": True,
                                  "data_format": "chat"},
                         train={"max_steps": 4, "eval_every": 2, "save_every": 2})
    tokenizer = load_tokenizer(base_model)
    data, collator = chat_data(recipe, tokenizer)
    record = load_sft_data(recipe, tokenizer).train[0]  # the same records, in the same order
    text = tokenizer.decode(record["input_ids"])
    targets = tokenizer.decode([t for t in data.train[0]["labels"] if t != -100])
    reply = text.rsplit("<|im_start|>assistant\n", 1)[1]
    assert targets == reply.rstrip("\n") and "The answer is" in targets  # the reply and its <|im_end|> only
    assert targets.endswith("<|im_end|>") and "<|im_start|>user" in text and "user" not in targets
    batch = collator([data.train[0], data.train[1]])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding is never a target
    final = run_distill(recipe)
    cache = load_file(str(recipe.run_dir / "teacher_top_k.safetensors"))
    assert cache["indices"].shape[0] == data.train_rows and cache["indices"].shape[-1] == 4
    assert (final / "model.safetensors").is_file()
    assert load_tokenizer(final).chat_template  # the student keeps the chat template it was trained with


def test_a_cached_teacher_on_packed_rows_gives_each_shuffled_batch_its_own_rows(tmp_path, base_model):
    from lmlab.stages.distill import distill_inputs
    from lmlab.stages.packed import prepare_packed

    recipe = tiny_recipe(tmp_path, None, name="packed_student", stage="distill", tokenizer={},
                         distill={"teacher": str(base_model), "top_k": 4, "cache_teacher": True},
                         train={"max_steps": 2})
    recipe.run_dir.mkdir(parents=True)  # run_distill makes it before preparing; the cache is written there
    trainer = prepare_packed(recipe, *distill_inputs(recipe)).trainer
    assert trainer.cache["indices"].shape[0] == len(trainer.train_dataset)
    batch = next(iter(trainer.get_train_dataloader()))  # the sampler shuffles: row ids are not 0..n
    assert batch["row_id"].tolist() != list(range(len(batch["row_id"])))
    batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
    trainer.model.train()
    with torch.no_grad():
        cached = trainer.compute_loss(trainer.model, batch)
        trainer.cache = None  # the same top-k, computed by the teacher on these rows now
        live = trainer.compute_loss(trainer.model, batch)
    assert torch.allclose(cached, live, rtol=1e-5)
