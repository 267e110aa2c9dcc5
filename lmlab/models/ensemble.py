"""Ensembles of K causal LMs whose logits (or log-probabilities) are averaged (Kotha et al., 2025).

With fixed data, K independently trained members (different seeds and data
orders) averaged at the logits reach a lower loss than one model of K times the
parameters. An ensemble is saved as a manifest of member directories plus the
shared tokenizer, and loads through `lmlab.models.build.load_model`, so
evaluation, generation and distillation use it like any checkpoint. transformers
has no multi-model generate, so `generate` here is a small loop with one KV
cache per member.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from lmlab.errors import LmlabError
from lmlab.paths import write_json_atomic

ENSEMBLE_FILE = "ensemble.json"
Combine = Literal["logits", "logprobs"]


def combine_logits(member_logits: list[torch.Tensor], how: Combine = "logits") -> torch.Tensor:
    """The mean of the members' logits, or of their log-probabilities (a log-linear pool)."""
    stacked = torch.stack([x.float() for x in member_logits])
    if how == "logprobs":
        stacked = torch.log_softmax(stacked, dim=-1)
    return stacked.mean(dim=0)


class EnsembleCausalLM(torch.nn.Module):
    """K causal LMs behind one forward: `.logits` are the combined logits, `.loss` their next-token CE."""

    def __init__(self, members: list, combine: Combine = "logits"):
        super().__init__()
        if not members:
            raise LmlabError("an ensemble needs at least one member")
        vocab = {m.config.vocab_size for m in members}
        if len(vocab) > 1:
            raise LmlabError(f"ensemble members have different vocabularies: {sorted(vocab)}", field="members")
        self.members = torch.nn.ModuleList(members)
        self.combine = combine
        self.config = members[0].config
        self.generation_config = members[0].generation_config

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutput

        logits = combine_logits([m(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
                                 for m in self.members], self.combine)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, num_return_sequences: int = 1, eos_token_id=None, pad_token_id: int = 0,
                 min_new_tokens: int | None = None, **_) -> torch.Tensor:
        """Greedy or sampled decoding from the combined logits, each member with its own KV cache;
        returns prompt + new tokens like `transformers.generate` (left-padded prompts)."""
        from transformers import DynamicCache

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
        stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                             device=input_ids.device, dtype=torch.long)
        caches = [DynamicCache() for _ in self.members]
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        step_ids, out = input_ids, input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            logits = combine_logits([m(input_ids=step_ids, attention_mask=attention_mask, position_ids=positions,
                                       past_key_values=cache, use_cache=True).logits[:, -1]
                                     for m, cache in zip(self.members, caches)], self.combine)
            if min_new_tokens and step < min_new_tokens and len(stops):
                logits[:, stops] = float("-inf")
            if do_sample:
                next_ids = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(-1)
            else:
                next_ids = logits.argmax(dim=-1)
            next_ids = torch.where(done, torch.full_like(next_ids, pad_token_id), next_ids)
            out = torch.cat([out, next_ids[:, None]], dim=1)
            done |= torch.isin(next_ids, stops)
            if done.all():
                break
            step_ids = next_ids[:, None]
            attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
            positions = positions[:, -1:] + 1
        return out


def save_ensemble(member_dirs: list[str | Path], out_dir: str | Path, combine: Combine = "logits") -> Path:
    """Write `ensemble.json` (absolute member paths, how they combine) and the members' shared tokenizer."""
    from lmlab.data.tokenizer import load_tokenizer

    if len(member_dirs) < 2:
        raise LmlabError(f"an ensemble needs at least two members, got {len(member_dirs)}", field="members")
    tokenizers = [load_tokenizer(d) for d in member_dirs]
    for directory, tokenizer in zip(member_dirs[1:], tokenizers[1:]):
        if tokenizer.get_vocab() != tokenizers[0].get_vocab():
            raise LmlabError("this member's tokenizer differs from the first member's: their logits would "
                             "index different tokens", file=str(directory), field="tokenizer")
    for directory in member_dirs:
        config = json.loads((Path(directory) / "config.json").read_text())
        if config.get("vocab_size") != json.loads((Path(member_dirs[0]) / "config.json").read_text())["vocab_size"]:
            raise LmlabError("this member's vocabulary size differs from the first member's", file=str(directory),
                             field="vocab_size")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizers[0].save_pretrained(out_dir)
    manifest = {"members": [str(Path(d).resolve()) for d in member_dirs], "combine": combine}
    write_json_atomic(out_dir / ENSEMBLE_FILE, manifest)
    return out_dir


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def load_ensemble(path: str | Path, load_member: Callable[[str], Any]) -> EnsembleCausalLM:
    """The ensemble's members, each loaded by `load_member` (`lmlab.models.build.load_model`), as one model."""
    manifest = json.loads((Path(path) / ENSEMBLE_FILE).read_text())
    missing = [m for m in manifest["members"] if not Path(m).is_dir()]
    if missing:
        raise LmlabError(f"ensemble member not found: {missing[0]}", file=str(Path(path) / ENSEMBLE_FILE),
                         field="members")
    members = [load_member(m) for m in manifest["members"]]
    return EnsembleCausalLM(members, manifest.get("combine", "logits")).eval()
