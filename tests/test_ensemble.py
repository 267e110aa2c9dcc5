"""Ensembles: logits are the mean of the members', generation matches a cache-free decode, bad members refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmlab.errors import LmlabError


def _member(tmp_path, tok_dir, seed: int, vocab: int | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmlab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    out = tmp_path / f"member{seed}"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_ensemble_logits_are_the_mean_of_member_logits(tmp_path, tok_dir):
    from lmlab.models.build import load_model
    from lmlab.models.ensemble import save_ensemble

    members = [_member(tmp_path, tok_dir, s) for s in (1, 2, 3)]
    ids = torch.randint(0, 300, (2, 9))
    each = [load_model(m)(input_ids=ids).logits for m in members]
    ensemble = load_model(save_ensemble(members, tmp_path / "ens"))
    assert torch.allclose(ensemble(input_ids=ids).logits, torch.stack(each).mean(0), atol=1e-6)
    pooled = load_model(save_ensemble(members, tmp_path / "ens_lp", combine="logprobs"))
    expected = torch.stack([torch.log_softmax(x, -1) for x in each]).mean(0)
    assert torch.allclose(pooled(input_ids=ids).logits, expected, atol=1e-6)
    out = ensemble(input_ids=ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert out.loss.item() == pytest.approx(manual.item())


def test_ensemble_generation_with_caches_matches_decoding_without(tmp_path, tok_dir):
    from lmlab.models.build import load_model
    from lmlab.models.ensemble import save_ensemble

    ensemble = load_model(save_ensemble([_member(tmp_path, tok_dir, s) for s in (1, 2)], tmp_path / "ens"))
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left padded with pad id 0
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = ensemble.generate(prompt, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    assert out.shape == (2, 11)
    for row in range(2):  # greedy decoding of each prompt alone, recomputing everything each step
        ids = prompt[row][mask[row].bool()][None]
        for _ in range(6):
            ids = torch.cat([ids, ensemble(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert out[row, 5:].tolist() == ids[0, -6:].tolist()


def test_evaluation_runs_on_an_ensemble_directory(tmp_path, tok_dir):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.evaluate.tasks import load_task, run_task
    from lmlab.models.build import load_model
    from lmlab.models.ensemble import save_ensemble

    from lmlab.models.ensemble import EnsembleCausalLM

    members = [_member(tmp_path, tok_dir, s) for s in (1, 2)]
    path = save_ensemble(members, tmp_path / "ens")
    model, tokenizer, task = load_model(path), load_tokenizer(path), load_task("math_id", 3)
    assert isinstance(model, EnsembleCausalLM) and len(model.members) == 2  # the directory loads as the ensemble
    result = run_task(model, tokenizer, task, samples=2)
    in_memory = EnsembleCausalLM([load_model(m) for m in members]).eval()
    assert {k: v.num for k, v in result.items()} == \
        {k: v.num for k, v in run_task(in_memory, tokenizer, task, samples=2).items()}
    assert set(result) == {"math_id/greedy_accuracy", "math_id/greedy_accuracy_flexible", "math_id/maj@2",
                           "math_id/pass@2", "math_id/mean@2"}
    # the ensemble predicts the normalised geometric mean of its members: on held-out text its bits per byte equal the
    # in-memory ensemble's, differ from each member's, and are no worse than the members' mean (its normaliser <= 1)
    from lmlab.data.split import held_out_general_texts
    from lmlab.evaluate.likelihood import text_bits_per_byte

    texts = held_out_general_texts(3)
    ensemble = text_bits_per_byte(model, tokenizer, texts, max_length=128)
    assert float(ensemble) == pytest.approx(float(text_bits_per_byte(in_memory, tokenizer, texts, max_length=128)),
                                            rel=1e-6)
    each = [float(text_bits_per_byte(load_model(m), tokenizer, texts, max_length=128)) for m in members]
    assert all(abs(float(ensemble) - b) > 1e-4 for b in each)
    assert float(ensemble) <= sum(each) / len(each) + 1e-9


def test_members_with_other_tokenizers_or_vocabularies_are_refused(tmp_path, tok_dir, base_model):
    from lmlab.models.ensemble import save_ensemble

    with pytest.raises(LmlabError, match="tokenizer differs from the first member's"):
        save_ensemble([_member(tmp_path, tok_dir, 1), base_model], tmp_path / "bad")
    odd = _member(tmp_path, tok_dir, 2, vocab=700)
    with pytest.raises(LmlabError, match="vocabulary size differs"):
        save_ensemble([_member(tmp_path, tok_dir, 1), odd], tmp_path / "bad2")
    with pytest.raises(LmlabError, match="at least two members"):
        save_ensemble([odd], tmp_path / "bad3")
    shutil.rmtree(odd)
